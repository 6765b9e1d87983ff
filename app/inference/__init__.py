"""Inference with a trained model: the exported model directory (`model_dir`), its export from a
run's checkpoint (`export`), exact and index search over all classes (`search`, `index`), the
inputs and outputs of `python -m app.predict` (`inputs`, `output`) and the prediction loop,
in one process or under mpirun (`predictor`)."""
