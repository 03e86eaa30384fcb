"""The Flower backend: fedssl's federations on Flower's Message API.

This package is the only one that imports `flwr`, so that Flower's moving API
touches one place. `codec` maps fedssl's messages to Flower records, `client` and
`server` are the ClientApp and ServerApp, `simulation` runs both on Flower's
simulation engine.
"""

from fedssl.extras import require

require("flwr", "flower")  # every module here imports flwr: one clear line when the extra is missing
