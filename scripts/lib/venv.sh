# Shared by scripts/run and scripts/test: create .venv and install appliance into it,
# re-installing only when pyproject.toml changed since the last install.
VENV="${APPLIANCE_VENV:-$here/.venv}"

ensure_venv() {
    local extras="$1" stamp want
    local python="${PYTHON:-python3}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$python" -m venv "$VENV"
    fi
    stamp="$VENV/.appliance-installed"
    want="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)-${extras}"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install --quiet -e "$here${extras:+[$extras]}"
        echo "$want" > "$stamp"
    fi
}
