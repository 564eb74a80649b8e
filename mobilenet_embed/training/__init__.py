"""The parts `mobilenet_embed.train.train` drives, one job each.

- `step`: the optimizer step (`TrainStep`), model and head variables in one tape, any strategy;
- `setup`: the model, optimizer, margin head and checkpoint under the strategy's scope, and resuming them;
- `run_dir`: the run directory (``config.yaml`` written and compared, artefact paths, ``summary.json``);
- `run_data`: the image index and the validation pairs;
- `validation`: scoring the pairs and tracking the best checkpoint;
- `guards`: the non-finite loss / gradient stop and the collapse warning;
- `signals`: SIGINT / SIGTERM finish the step, checkpoint and return;
- `loop`: the step loop that ties them together.
"""
