"""Loading: merge order, provenance, rendered problems, round trips and the digest."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from appliance.config.load import (
    DEFAULT,
    ConfigError,
    LoadedConfig,
    Problem,
    load_config,
    render_origins,
    render_toml,
)
from appliance.config.schema import Settings


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _problems(path: Path, *, explicit: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, explicit=explicit)
    return [str(problem) for problem in info.value.problems]


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return tmp_path / "appliance.toml"


def test_merge_order_and_provenance(main: Path) -> None:
    _write(
        main,
        """
[workers]
count = 2
max = 8
[log]
level = "debug"
[[listen]]
name = "http"
address = "127.0.0.1:8000"
[[listen]]
name = "admin"
address = "127.0.0.1:8001"
""",
    )
    later = _write(
        main.parent / "conf.d/50-site.toml",
        """
[workers]
count = 4
[[listen]]
name = "public"
address = "0.0.0.0:80"
""",
    )
    earlier = _write(main.parent / "conf.d/10-package.toml", "[workers]\ncount = 3\nmin = 2\n")
    loaded = load_config(main, explicit=True)
    assert loaded.files == (main, earlier, later)
    # Tables merge key by key; the latest file wins for a scalar.
    assert loaded.settings.workers.count == 4
    assert loaded.settings.workers.min == 2
    assert loaded.settings.workers.max == 8
    assert loaded.settings.log.level == "debug"
    # Arrays of tables are replaced whole, never merged by position.
    assert [entry.name for entry in loaded.settings.listen] == ["public"]
    assert loaded.origins["workers.count"] == str(later)
    assert loaded.origins["workers.min"] == str(earlier)
    assert loaded.origins["workers.max"] == str(main)
    assert loaded.origins["listen"] == str(later)
    assert loaded.origins["log.level"] == str(main)
    assert loaded.origins["log.format"] == DEFAULT
    assert loaded.origins["http.limit_concurrency"] == DEFAULT
    assert not any(key.startswith("listen[") for key in loaded.origins)
    assert loaded.raw["workers"] == {"count": 4, "max": 8, "min": 2}


def test_a_later_table_replaces_an_earlier_array_attribution(main: Path) -> None:
    _write(main, '[[listen]]\nname = "a"\naddress = "127.0.0.1:1"\n')
    drop_in = _write(main.parent / "conf.d/20.toml", "[workers]\nmin = 1\n")
    loaded = load_config(main)
    assert loaded.origins["listen"] == str(main)
    assert loaded.origins["workers.min"] == str(drop_in)


def test_a_scalar_replacing_a_table_takes_over_its_provenance(main: Path) -> None:
    _write(main, "[workers]\ncount = 2\nmin = 1\n[junk]\n")
    site = _write(main.parent / "conf.d/50-site.toml", "workers = 3\n[junk]\n")
    assert _problems(main) == [
        f"{site}: workers: expected a table (got 3)",
        (
            f"{main}: junk: unknown setting; valid tables: app, workers, reload, listen, http, "
            "websocket, wsgi, watchdog, control, agent, log"
        ),
    ]


def test_hidden_and_non_toml_files_are_ignored(main: Path) -> None:
    _write(main, "")
    _write(main.parent / "conf.d/.50-hidden.toml", "[workers]\ncount = 7\n")
    _write(main.parent / "conf.d/50-site.toml~", "[workers]\ncount = 7\n")
    _write(main.parent / "conf.d/50-site.toml.dpkg-old", "[workers]\ncount = 7\n")
    (main.parent / "conf.d/.#60-lock.toml").symlink_to("nowhere")  # an editor's lock file
    loaded = load_config(main)
    assert loaded.settings.workers.count == "auto"
    assert loaded.files == (main,)


def test_a_directory_named_like_a_drop_in_is_an_error(main: Path) -> None:
    # Silently skipping it would silently drop the settings the operator meant to put there.
    _write(main, "")
    (main.parent / "conf.d/60-dir.toml").mkdir(parents=True)
    assert _problems(main) == [
        f"{main.parent}/conf.d/60-dir.toml: not a regular file (a directory)"
    ]


def test_a_dangling_drop_in_symlink_is_an_error(main: Path) -> None:
    _write(main, "")
    (main.parent / "conf.d").mkdir()
    (main.parent / "conf.d/50-site.toml").symlink_to(main.parent / "gone.toml")
    assert _problems(main) == [
        f"{main.parent}/conf.d/50-site.toml: file not found (a dangling symbolic link)"
    ]


def test_missing_main_file(main: Path) -> None:
    assert _problems(main) == [f"{main}: file not found"]
    # Not named by the operator: defaults, but its conf.d is still read.
    assert load_config(main).settings == Settings()
    drop_in = _write(main.parent / "conf.d/10.toml", "[reload]\nsurge = 2\n")
    loaded = load_config(main)
    assert loaded.settings.reload.surge == 2
    assert loaded.files == (drop_in,)


def test_toml_syntax_error(main: Path) -> None:
    _write(main, "[workers]\ncount = 4\nmin = \n")
    assert _problems(main) == [f"{main}: line 3, column 7: Invalid value"]


def test_syntax_errors_of_every_file_are_reported(main: Path) -> None:
    _write(main, "[workers\n")
    bad = _write(main.parent / "conf.d/10.toml", 'a = "unterminated\n')
    problems = _problems(main)
    assert len(problems) == 2
    assert problems[0].startswith(f"{main}: line 1, column 9: ")
    assert problems[1].startswith(f"{bad}: line 1, column ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(main: Path) -> None:
    _write(main, "")
    main.chmod(0)
    assert _problems(main) == [f"{main}: cannot read file: Permission denied"]


def test_main_path_that_is_a_directory(main: Path) -> None:
    main.mkdir()
    assert _problems(main) == [f"{main}: not a regular file (a directory)"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[workers]\ncount = -1\n",
            "workers.count: Input should be greater than or equal to 1 (got -1)",
        ),
        (
            '[workers]\ncount = "sixteen"\n',
            'workers.count: Input should be "auto" or an integer (got "sixteen")',
        ),
        ('[workers]\nmin = "2"\n', 'workers.min: Input should be a valid integer (got "2")'),
        (
            "[workers]\ncuont = 4\n",
            'workers.cuont: unknown setting; did you mean "workers.count"?',
        ),
        ("[worker]\ncount = 4\n", 'worker: unknown setting; did you mean "workers"?'),
        (
            '[[listen]]\nname = "http"\naddress = "127.0.0.1:1"\nreuse_prot = true\n',
            'listen[0].reuse_prot: unknown setting; did you mean "listen[0].reuse_port"?',
        ),
        (
            '[[listen]]\nname = "http"\naddress = "localhost"\n',
            (
                "listen[0].address: expected HOST:PORT, [IPV6]:PORT or unix:/ABSOLUTE/PATH "
                '(got "localhost")'
            ),
        ),
        (
            (
                '[[listen]]\nname = "http"\naddress = "127.0.0.1:1"\n'
                '[[listen]]\nname = "http"\naddress = "127.0.0.1:2"\n'
            ),
            'listen[1].name: duplicate listen name, already used by listen[0] (got "http")',
        ),
        (
            "[workers]\nmin = 8\nmax = 4\n",
            "workers.min: must be less than or equal to workers.max (4) (got 8)",
        ),
        (
            "[workers]\ncount = 9\nmax = 4\n",
            "workers.count: must be between workers.min (1) and workers.max (4) (got 9)",
        ),
        (
            '[app]\ninterface = "cgi"\n',
            'app.interface: Input should be "asgi" or "wsgi" (got "cgi")',
        ),
        (
            '[http]\naccess_log = "true"\n',
            'http.access_log: Input should be a valid boolean (got "true")',
        ),
        ("workers = 3\n", "workers: expected a table (got 3)"),
        ('[[listen]]\naddress = "127.0.0.1:1"\n', "listen[0].name: required setting is missing"),
        (
            "listen = []\n",
            "listen: List should have at least 1 item after validation, not 0 (got [])",
        ),
    ],
)
def test_rendered_problems(main: Path, text: str, problem: str) -> None:
    _write(main, text)
    assert _problems(main) == [f"{main}: {problem}"]


def test_cross_field_problem_blames_the_file_that_set_the_key(main: Path) -> None:
    _write(main, "[workers]\nmax = 4\n")
    site = _write(main.parent / "conf.d/50-site.toml", "[workers]\nmin = 8\n")
    assert _problems(main) == [
        f"{site}: workers.min: must be less than or equal to workers.max (4) (got 8)"
    ]


def test_cross_field_problem_blames_the_key_that_was_set(main: Path) -> None:
    # Only the timeout was set; the interval is a default, so the timeout is what to fix.
    _write(main, "[workers]\nheartbeat_timeout_s = 0.5\n")
    assert _problems(main) == [
        (
            f"{main}: workers.heartbeat_timeout_s: must be greater than "
            "workers.heartbeat_interval_s (1.0) (got 0.5)"
        )
    ]


def test_problem_is_attributed_to_the_file_that_set_the_key(main: Path) -> None:
    _write(main, "[workers]\ncount = 2\n")
    site = _write(main.parent / "conf.d/50-site.toml", "[workers]\nmax_rss_mb = -5\n")
    assert _problems(main) == [
        f"{site}: workers.max_rss_mb: Input should be greater than or equal to 0 (got -5)"
    ]


def test_several_problems_are_all_reported(main: Path) -> None:
    _write(main, '[workers]\ncount = 0\nmin = 0\n[log]\nlevel = "loud"\n')
    problems = _problems(main)
    assert [problem.split(": ")[1] for problem in problems] == [
        "workers.count",
        "workers.min",
        "log.level",
    ]


def test_problem_str_without_value_and_key() -> None:
    assert str(Problem("f.toml", "", "file not found")) == "f.toml: file not found"
    assert str(Problem("f.toml", "a.b", "bad", 1.5, True)) == "f.toml: a.b: bad (got 1.5)"
    assert str(Problem("f.toml", "a.b", "bad", False, True)) == "f.toml: a.b: bad (got false)"
    error = ConfigError([Problem("a", "", "x"), Problem("b", "", "y")])
    assert str(error) == "a: x\nb: y"


def _reload(text: str, tmp_path: Path) -> LoadedConfig:
    path = _write(tmp_path / "again" / "appliance.toml", text)
    return load_config(path, explicit=True)


def test_render_toml_round_trips(main: Path, tmp_path: Path) -> None:
    _write(
        main,
        """
[app]
directory = "/srv/app"
[workers]
count = 3
boot_timeout_s = 12
[http]
limit_concurrency = 100
[[listen]]
name = "http"
address = "[::1]:8080"
[[listen]]
name = "sock"
address = "unix:/run/appliance/http.sock"
mode = "0600"
""",
    )
    loaded = load_config(main)
    text = render_toml(loaded)
    again = _reload(text, tmp_path)
    assert again.settings == loaded.settings
    assert again.digest == loaded.digest
    defaults = load_config(tmp_path / "none.toml")
    assert _reload(render_toml(defaults), tmp_path).settings == Settings()
    assert "directory" not in render_toml(defaults)  # unset optional settings are left out


def test_render_origins(main: Path, tmp_path: Path) -> None:
    _write(main, "[workers]\ncount = 3\n")
    loaded = load_config(main)
    text = render_origins(loaded)
    lines = text.splitlines()
    assert re.fullmatch(
        rf"count = 3 +# {re.escape(str(main))}", lines[lines.index("[workers]") + 1]
    )
    assert 'level = "info"   # (default)' in lines  # aligned within its table
    assert any(line.startswith("# limit_concurrency (unset)") for line in lines)
    # Every setting line carries its origin, and the listing is itself valid TOML.
    for line in lines:
        if line and not line.startswith("["):
            assert "  # " in line, line
    assert Settings.model_validate(tomllib.loads(text)) == loaded.settings
    assert _reload(text, tmp_path).settings == loaded.settings


def test_digest_is_stable_and_tracks_values(main: Path, tmp_path: Path) -> None:
    _write(main, "[workers]\ncount = 3\nboot_timeout_s = 30\n")
    first = load_config(main).digest
    assert len(first) == 12
    assert int(first, 16) >= 0
    # Same effective settings written differently: same digest.
    _write(main, "workers.count = 3\nworkers.boot_timeout_s = 30.0\n")
    assert load_config(main).digest == first
    _write(main, "[workers]\ncount = 4\n")
    assert load_config(main).digest != first
    assert load_config(tmp_path / "missing.toml").digest == load_config(tmp_path / "m2").digest
