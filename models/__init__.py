"""The models. The names a configuration chooses among live here, not beside the torch code that builds them,
so that checking a configuration (pipeline.config) does not import torch."""

ENCODERS = ("tsf-base", "tsf-tiny", "videoprism", "videoprism-tiny")  # models.encoders
SIZES = ("base", "demo", "tiny")  # caption model sizes, models.recap
FREEZE = ("official", "none")  # what a caption training run leaves frozen, models.training
