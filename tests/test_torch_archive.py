"""convert/torch_archive.py: PyTorch zip archives read without torch, and refused when tampered.

The TorchScript FID Inception itself is checked in test_fid.py (bitwise equal to what
torch.jit.load gives, read in a process where torch cannot be imported)."""

import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from diffusion_jax.convert import torch_archive
from diffusion_jax.eval import inception

torch = pytest.importorskip("torch")


def test_torch_save_archives_read_bitwise_without_torch(tmp_path):
    state = {
        "weight": torch.randn(3, 4),
        "transposed": torch.randn(4, 3).t(),  # non-contiguous: strides matter
        "slice": torch.randn(6)[2:5],  # a storage offset
        "shared": None,  # the same storage as "weight", viewed again
        "index": torch.arange(5),
        "half": torch.randn(2, 2).half(),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(2)),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }
    state["shared"] = state["weight"][1]
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "model.ckpt")

    read = torch_archive.read_state_dict(tmp_path / "model.ckpt")
    assert read.keys() == state.keys()
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            assert read[key].dtype == ml_dtypes.bfloat16
            expected, found = tensor.float().numpy(), read[key].astype(np.float32)
        else:
            expected, found = tensor.numpy(), read[key]
            assert found.dtype == expected.dtype, key
        assert found.shape == expected.shape and np.array_equal(found, expected), key


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: call a function on load
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pickle_naming_another_global_is_refused_without_running_it(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "good.pt")
    marker = tmp_path / "code_ran"
    with zipfile.ZipFile(tmp_path / "good.pt") as good, \
            zipfile.ZipFile(tmp_path / "tampered.pt", "w") as tampered:
        for item in good.infolist():
            data = good.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"weight": _RunsCode(marker)}, protocol=2)
            tampered.writestr(item, data)
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the payload works when unpickled freely
    assert marker.exists()
    marker.unlink()

    with pytest.raises(torch_archive.RefusedGlobal, match=r"refused to unpickle (__builtin__|builtins)\.exec"):
        torch_archive.read_state_dict(tmp_path / "tampered.pt")
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"refused to unpickle (__builtin__|builtins)\.exec"):
        inception.params_from_file(tmp_path / "tampered.pt")
    assert not marker.exists()


def test_files_that_are_not_archives(tmp_path):
    (tmp_path / "notes.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="not a PyTorch zip archive"):
        torch_archive.read_state_dict(tmp_path / "notes.zip")
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        torch_archive.read_state_dict(tmp_path / "list.pt")
