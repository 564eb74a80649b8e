"""Training log lines: the validation line with an unmeasurable VAL@FAR."""

import io

from mobilenet_embed.runlog import RunLog


def test_validation_line_says_val_is_na_with_too_few_pairs():
    out = io.StringIO()
    log = RunLog(None, total_steps=4, steps_per_epoch=2, start_step=0, log_every=1, stream=out, tty=False)
    log.log_validation(2, {"accuracy": 0.9, "accuracy_std": 0.1, "val": 1.0, "far": 1.0, "auc": 0.95,
                           "far_target": 0.001, "val_defined": 0.0, "val_different_pairs_needed": 1000.0}, 0.1, 20)
    line = out.getvalue().strip()
    assert "VAL 1.0000 @ FAR 1.0000" not in line
    assert "VAL@FAR=0.001 n/a (needs >= 1,000 different pairs), AUC 0.9500 (20 pairs" in line
