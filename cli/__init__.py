"""The ``accel`` command line (``python -m accel.cli`` or ``accel``)."""
