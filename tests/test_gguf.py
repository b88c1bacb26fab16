"""GGUF in and out: a model folder written as GGUF reads back (in transformers and in mlxft) as
the same model, an Ollama store's model is found by name, and both feed training."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from mlxft.cli import cli  # noqa: E402
from mlxft.errors import UserError  # noqa: E402
from mlxft.models import export as export_module  # noqa: E402
from mlxft.models.export import export_gguf  # noqa: E402
from mlxft.models.files import resolve_model_dir  # noqa: E402
from mlxft.models.gguf import runtime  # noqa: E402
from mlxft.models.gguf.names import permute, unpermute  # noqa: E402
from mlxft.models.gguf.read import gguf_folder  # noqa: E402
from mlxft.models.gguf.write import write_gguf  # noqa: E402
from mlxft.models.ollama import modelfile  # noqa: E402

TEXT = "Will the user like the news? Answer: Yes. café 1999"


def logits(folder_or_file, ids, gguf_file=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder_or_file), gguf_file=gguf_file, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_query_key_reordering_is_undone_exactly():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute(permute(w, 8), 8), w) and not np.array_equal(permute(w, 8), w)


@pytest.mark.parametrize("kind, bound", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_an_exported_file_reads_back_in_transformers_as_the_same_model(tiny_model_dir, tmp_path, kind, bound):
    info = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", kind)
    assert info["architecture"] == "llama" and info["tensors"] == 20
    source = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    read = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert read.encode(TEXT) == source.encode(TEXT) and read.chat_template == source.chat_template
    ids = [source.encode(TEXT)]
    reference = logits(tiny_model_dir, ids)
    difference = np.abs(logits(tmp_path, ids, gguf_file="tiny.gguf") - reference).max() / np.abs(reference).max()
    assert difference <= bound, difference


def test_a_gguf_file_is_a_model_name_for_both_backends(tiny_model_dir, tmp_path, home):
    import mlx.core as mx

    from mlxft.backends.mlx.model import load

    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f32")
    folder = resolve_model_dir(str(tmp_path / "tiny.gguf"))
    assert folder.parent == home and resolve_model_dir(str(tmp_path / "tiny.gguf")) == folder  # converted once
    ids = [transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode(TEXT)]
    reference = logits(tiny_model_dir, ids)
    assert np.abs(logits(folder, ids) - reference).max() < 1e-6
    model, _, _ = load(str(tmp_path / "tiny.gguf"))
    assert np.abs(np.array(model(mx.array(ids))) - reference).max() < 1e-4


def ollama_store(root, gguf_file, name="tiny", tag="latest", namespace="library"):
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf_file, root / "blobs" / f"sha256-{digest}")
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": gguf_file.stat().st_size},
    ]}))
    return manifest


def test_an_ollama_model_is_found_by_name(tiny_model_dir, tmp_path, home, monkeypatch):
    write_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f32")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    ollama_store(tmp_path / "ollama", tmp_path / "tiny.gguf", tag="2m")
    ollama_store(tmp_path / "ollama", tmp_path / "tiny.gguf", name="tiny", namespace="someone")
    assert resolve_model_dir("ollama:tiny:2m") == resolve_model_dir("ollama:someone/tiny") == gguf_folder(tmp_path / "tiny.gguf")
    with pytest.raises(UserError, match=r"not in the Ollama store .*run `ollama pull tiny` first"):
        resolve_model_dir("ollama:tiny")  # no 'latest' tag
    with pytest.raises(UserError, match="expected ollama:NAME"):
        resolve_model_dir("ollama:")
    broken = ollama_store(tmp_path / "ollama", tmp_path / "tiny.gguf", tag="broken")
    broken.write_text("{}")
    with pytest.raises(UserError, match="not an Ollama manifest with a model layer"):
        resolve_model_dir("ollama:tiny:broken")


def test_files_gguf_cannot_describe_are_named(tmp_path, home):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_model_dir(str(tmp_path / "fake.gguf"))
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="GGUF architecture 'mamba' is not supported yet"):
        resolve_model_dir(str(tmp_path / "other.gguf"))
    assert not any(home.glob("gguf-*"))  # no half-made cache folder


SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
                    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def with_template(tiny_model_dir, chat_template):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.chat_template = chat_template
    return tokenizer


def test_modelfile_templates_stops_and_the_default_system_prompt(tiny_model_dir):
    text = modelfile("./m.gguf", with_template(tiny_model_dir, SMOLLM2_TEMPLATE))
    assert text.startswith('FROM ./m.gguf\nTEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}')
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n" in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in text
    plain = with_template(tiny_model_dir, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert modelfile("./m.gguf", plain) == 'FROM ./m.gguf\nPARAMETER stop "</s>"\n'
    assert modelfile("./b.gguf", plain, adapter="./a.gguf").startswith("FROM ./b.gguf\nADAPTER ./a.gguf\n")


@pytest.mark.slow
def test_export_a_trained_run_check_it_and_train_from_the_file(tiny_model_dir, tmp_path, home, monkeypatch):
    run = CliRunner().invoke(cli, ["lora", "--recipe", "tallrec", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                                   "--set", "train.steps=2", "--set", "data.k_shot=8", "--set", "data.max_valid_rows=4",
                                   "--set", "train.batch_size=4", "--set", "eval.every=0", "--backend", "mlx"])
    assert run.exit_code == 0, run.output
    out = tmp_path / "ollama-in" / "tallrec.gguf"
    result = CliRunner().invoke(cli, ["export", "gguf", str(tmp_path / "run"), "--out", str(out), "--type", "q8_0",
                                      "--ollama", "tallrec"])
    assert result.exit_code == 0, result.output
    assert "fused 4 modules" in result.output
    assert ("certified in llama.cpp via" in result.output) == runtime.available(), result.output
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./tallrec.gguf\nTEMPLATE")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    ollama_store(tmp_path / "ollama", out, name="tallrec")
    again = CliRunner().invoke(cli, ["lora", "--recipe", "tallrec", "--model", "ollama:tallrec", "--out", str(tmp_path / "run2"),
                                     "--set", "train.steps=1", "--set", "data.k_shot=8", "--set", "data.max_valid_rows=4",
                                     "--set", "train.batch_size=4", "--set", "eval.every=0", "--backend", "mlx"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["steps"] == 1


def test_without_llama_cpp_the_file_is_read_back_and_the_export_says_it_never_ran(tiny_model_dir, tmp_path, monkeypatch):
    from mlxft.models.export import describe

    monkeypatch.setattr(runtime, "available", lambda: False)
    monkeypatch.setitem(export_module.TOLERANCE, "f16", 0.0)
    with pytest.raises(UserError, match="export check failed: .* nothing was kept"):
        export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f16", echo=lambda *a: None)
    assert list(tmp_path.iterdir()) == []
    report = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", "f32", echo=lambda *a: None)
    assert report["check"]["max_relative_difference"] == 0.0 and "certificate" not in report
    assert "NOT run in llama.cpp: llama-cpp-python is not installed" in describe(report)
    monkeypatch.setattr(runtime, "require", lambda what: (_ for _ in ()).throw(UserError(f"{what} needs llama.cpp")))
    with pytest.raises(UserError, match="--type q4_k_m .* needs llama.cpp"):
        export_gguf(tiny_model_dir, tmp_path / "q.gguf", "q4_k_m", echo=lambda *a: None)
