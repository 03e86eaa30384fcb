"""Update codecs: what a client sends compressed (Konečný et al. 2016), as a pipeline
of registered stages (`fedssl.choices.CODECS`). See `base` for what a codec is."""
