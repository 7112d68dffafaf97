"""Optional plugins that ship with igsp but are not part of the method's defaults."""
