"""The training layer (the training extra): the only part of flexbert that knows Composer."""
