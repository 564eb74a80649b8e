"""Scale work of issue 15: O(P) identity draws, parallel `prepare`, the relocatable check
cache, trusting `prepare`'s shards, uniform sampling of TFRecords, odd names, symlink loops and
the pixel limit of the data scan (issue 12, point 9). Tiny inputs in tmp_path."""

from __future__ import annotations

import json

import numpy as np

from mobilenet_embed.data import sampler


def _pass_key(seed):
    return lambda n: sampler.fold_key(seed, sampler.TAG_PASS, 1, n)


def test_choose_identities_is_a_stateless_permutation_per_pass():
    n, p = 23, 4  # 5 steps per pass, 3 identities left over
    steps = [sampler.choose_identities(n, p, s, _pass_key(7)).numpy() for s in range(10)]
    for batch in steps:
        assert len(set(batch.tolist())) == p and batch.min() >= 0 and batch.max() < n
    first, second = np.concatenate(steps[:5]), np.concatenate(steps[5:])
    assert len(set(first.tolist())) == 20 and len(set(second.tolist())) == 20  # once per pass
    assert not np.array_equal(first, second)  # each pass its own order
    again = sampler.choose_identities(n, p, 7, _pass_key(7)).numpy()  # step 7 alone, as on resume
    np.testing.assert_array_equal(again, steps[7])
    assert not np.array_equal(sampler.choose_identities(n, p, 7, _pass_key(8)).numpy(), steps[7])


def test_choose_identities_costs_p_not_the_identity_count():
    """2**40 identities: a full permutation (8 TB) cannot be built; P positions can."""
    ids = sampler.choose_identities(2 ** 40, 8, 123456789, _pass_key(0)).numpy()
    assert len(set(ids.tolist())) == 8 and ids.min() >= 0 and ids.max() < 2 ** 40


def _prepare(root, prefix, *extra):
    from click.testing import CliRunner

    from mobilenet_embed.cli import main

    result = CliRunner().invoke(main, ["prepare", "--set", "data.check_cache=null", "--data", str(root),
                                       "--out", str(prefix), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return result


def test_uniform_sampling_reads_tfrecord_shards(tmp_path):
    from test_data_pipeline import P, K, config, take, write_folder

    from mobilenet_embed.data import build_index, pk_batches

    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4, 2, 6, 2, 3, 4, 2])
    prefix = tmp_path / "out" / "faces"
    _prepare(root, prefix, "--shards", "3")
    cfg = config(None, "data.source=tfrecord", f"data.path={prefix}-*.tfrecord", "data.shuffle_buffer=8",
                 "loss.name=softmax", "data.sampling=uniform", "data.augment=false")
    index, _ = build_index(cfg.data)
    stream = take(pk_batches(cfg, index), 6)
    for images, labels in stream:
        assert images.shape == (P * K, 32, 32, 3) and labels.min() >= 0 and labels.max() < index.num_identities
        # P*K distinct records: no two rows of a batch are the same image
        assert len({im.tobytes() for im in images}) == P * K
    assert any(not (y.reshape(P, K) == y.reshape(P, K)[:, :1]).all() for _, y in stream)  # not P x K
    assert len(set(np.concatenate([y for _, y in stream]).tolist())) > P
    resumed = take(pk_batches(cfg, index, start_step=4), 2)
    for (a, la), (b, lb) in zip(stream[4:], resumed):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(a, b)


def test_prepare_writes_shards_in_parallel_with_the_same_output(tmp_path):
    from test_data_pipeline import write_folder

    root = tmp_path / "faces"
    write_folder(root, [2, 5, 3, 4, 2, 6, 2, 3, 4, 2, 3, 2])
    one = _prepare(root, tmp_path / "one" / "faces", "--shards", "5", "--workers", "1")
    many = _prepare(root, tmp_path / "many" / "faces", "--shards", "5", "--workers", "3")
    assert "(1 at once)" in one.output and "(3 at once)" in many.output
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "many").iterdir()) and len(names) == 11
    for name in names:
        a, b = (tmp_path / "one" / name).read_bytes(), (tmp_path / "many" / name).read_bytes()
        if name.endswith(".manifest.json"):
            a, b = ({k: v for k, v in json.loads(x).items() if k != "created"} for x in (a, b))
        assert a == b, name
    # records serialised deterministically (map keys sorted), so another process writes the same bytes
    first = (tmp_path / "one" / "faces-00000-of-00005.tfrecord").read_bytes()
    at = [first.find(key) for key in (b"identity", b"image", b"label", b"path")]
    assert -1 not in at and at == sorted(at)
