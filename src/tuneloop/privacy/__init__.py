"""Personal data: masked before anything is written (`mask`)."""
