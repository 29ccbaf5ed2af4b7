"""The ``accel`` commands of accel-peft (entry-point group ``accel.commands``)."""
