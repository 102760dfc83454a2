"""Apps that ship with appliance."""
