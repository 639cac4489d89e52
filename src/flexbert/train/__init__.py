"""The training layer: the only part of flexbert that knows Composer."""
