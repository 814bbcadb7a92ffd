"""The datus command: cli (dispatch, one-line errors), predict (LightningCLI) with predict_options
(its options as data), evaluate and prepare/."""
