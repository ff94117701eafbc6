"""`pytorch_model.bin` / `mm_projector.bin` read without torch: the same arrays torch saved."""

import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe_llava_jax.convert import safetensors_io, torch_pickle  # noqa: E402


def test_state_dict_tensors_read_as_torch_saved_them(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "model.mm_projector.image_spatial_proj.0.weight": base,
        "transposed": base.t(),  # strides that are not row-major
        "offset_view": base[1:, 2:],  # a view into a shared storage, with an offset
        "bf16": torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
        "fp16": torch.tensor([1.5, -0.25], dtype=torch.float16),
        "int64": torch.tensor([3, -1]),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save(state, tmp_path / "mm_projector.bin")
    tensors = torch_pickle.read_file(tmp_path / "mm_projector.bin")
    assert tensors.keys() == state.keys()
    for name, expected in state.items():
        expected = expected.detach()
        if expected.dtype == torch.bfloat16:
            want = expected.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            want = expected.numpy()
        assert tensors[name].dtype == want.dtype, name
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)


def test_a_directory_with_only_pytorch_model_bin_reads(tmp_path):
    torch.save({"w": torch.eye(3)}, tmp_path / "pytorch_model.bin")
    np.testing.assert_array_equal(safetensors_io.read_checkpoint(tmp_path)["w"], np.eye(3))


def test_code_in_the_pickle_is_refused_by_name(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"w": torch.ones(1), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing (__builtin__|builtins).print"):
        torch_pickle.read_file(tmp_path / "evil.bin")


def test_a_legacy_or_foreign_file_fails_clearly(tmp_path):
    (tmp_path / "old.bin").write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="not a zip-format torch.save file"):
        torch_pickle.read_file(tmp_path / "old.bin")
    with zipfile.ZipFile(tmp_path / "empty.bin", "w") as z:
        z.writestr("x/version", "3")
    with pytest.raises(ValueError, match="expected one \\*/data.pkl"):
        torch_pickle.read_file(tmp_path / "empty.bin")
