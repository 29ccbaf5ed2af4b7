"""Sample acceleration configs (fms-acceleration layout), shipped as package data of ``accel.configs``."""
