"""Models: packaged encoders, converters and the text classifier built on them."""
