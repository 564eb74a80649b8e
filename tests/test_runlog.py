"""Training log lines: the validation line with an unmeasurable VAL@FAR."""

import io

from mobilenet_embed.runlog import RunLog, plain_line


def test_validation_line_says_val_is_na_with_too_few_pairs():
    out = io.StringIO()
    log = RunLog(None, total_steps=4, steps_per_epoch=2, start_step=0, log_every=1, stream=out, tty=False)
    log.log_validation(2, {"accuracy": 0.9, "accuracy_std": 0.1, "val": 1.0, "far": 1.0, "auc": 0.95,
                           "far_target": 0.001, "val_defined": 0.0, "val_different_pairs_needed": 1000.0}, 0.1, 20)
    line = out.getvalue().strip()
    assert "VAL 1.0000 @ FAR 1.0000" not in line
    assert "VAL@FAR=0.001 n/a (needs >= 1,000 different pairs), AUC 0.9500 (20 pairs" in line


def test_plain_line_shows_both_loss_terms_of_a_head_with_a_triplet_term():
    values = {"loss": 3.5, "head_loss": 2.5, "triplet_loss": 0.1, "learning_rate": 1e-3}
    line = plain_line(50, 100, 1, 2, values, eta=None)
    assert line.startswith("step 50/100 epoch 1/2 loss 3.5000 (head 2.5000 triplet 0.1000) lr 1.0e-03")
    assert "head" not in plain_line(50, 100, 1, 2, {"loss": 3.5}, eta=None)
