"""The routed-ensemble runtime a consumer imports (router, mixing, generation, evaluation,
download and verification). It never imports the coordinator."""
