"""The per-client fast paths added for throughput (issue 2) keep their old behaviour."""

from __future__ import annotations

import numpy as np
import torch

from rayfed.algorithms.base import to_numpy
from rayfed.training import only_trainable


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_only_trainable_yields_named_trainable_params_and_restores_every_flag():
    m = _model()
    m[2].bias.requires_grad_(False)  # frozen before the block: must stay out and stay frozen
    with only_trainable(m, ["0.weight", "2.weight", "2.bias"]) as params:
        assert params == [m[0].weight, m[2].weight]
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.weight", "2.weight"]
        m[0].weight.requires_grad_(False)  # changed inside the block: restored on exit
    assert {n: p.requires_grad for n, p in m.named_parameters()} == {
        "0.weight": True, "0.bias": True, "2.weight": True, "2.bias": False}


def test_only_trainable_restores_flags_when_the_block_raises():
    m = _model()
    try:
        with only_trainable(m, []) as params:
            assert params == []
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(p.requires_grad for p in m.parameters())


def test_to_numpy_is_a_detached_copy():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_(True)
    a = to_numpy(t)
    assert a.dtype == np.float32 and a.shape == (2, 3) and a.flags.writeable
    with torch.no_grad():
        t.add_(1.0)
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32).reshape(2, 3))  # not a view
    a[0, 0] = -1.0
    assert float(t.detach()[0, 0]) == 1.0
    c = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64).conj()  # lazily conjugated view
    np.testing.assert_array_equal(to_numpy(c), np.array([1 - 2j, 3 + 1j], dtype=np.complex64))


def test_upload_batch_round_trips_every_client_exactly():
    import pickle

    from rayfed.runtime.ray_executor import _UploadBatch

    rng = np.random.default_rng(0)
    big = rng.standard_normal(_UploadBatch.PACK_BELOW // 4 + 1).astype(np.float32)  # stays unpacked
    uploads = {
        3: {"w": rng.standard_normal((4, 5)).astype(np.float32), "b": np.array(2.5),
            "mask": np.array([True, False, True]), "big": big},
        7: {"w": rng.standard_normal((4, 5)).astype(np.float32)[:, ::2],  # not contiguous
            "aux/count": np.arange(3, dtype=np.int64), "aux/note": "kept as is"},
        9: {},
    }
    batch = pickle.loads(pickle.dumps(_UploadBatch(uploads), protocol=5))
    assert sorted(batch.client_ids()) == [3, 7, 9]
    for cid, tensors in uploads.items():
        got = batch.tensors(cid)
        assert list(got) == list(tensors)  # same keys, same order
        for k, v in tensors.items():
            if isinstance(v, np.ndarray):
                assert got[k].dtype == v.dtype and got[k].shape == v.shape
                np.testing.assert_array_equal(got[k], v)
            else:
                assert got[k] == v
    assert set(batch.packed) == {np.dtype(np.float32).str, np.dtype(np.float64).str, np.dtype(bool).str,
                                 np.dtype(np.int64).str}
