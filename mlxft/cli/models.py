"""`mlxft fuse`, `export gguf`, `generate`, `chat` and `serve`: what is done with a model once trained."""

from __future__ import annotations

from pathlib import Path

import click

from mlxft.cli.common import BACKEND_OPTION, Group, cli, generation_options, load_generator, model_backend, sampling_from, sampling_options
from mlxft.errors import UserError


@cli.command("fuse")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="An adapter folder (PEFT layout) or a run folder (its best/, else last/).")
@click.option("--model", default=None, help="Base model; default: the adapter's base_model_name_or_path.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the fused model.")
@click.option("--dequantize", is_flag=True, help="Full-precision output (the default for a quantized base; kept for mlx-lm users).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the fused model to 4 or 8 bits.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@BACKEND_OPTION
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model to run its own code (off by default).")
def fuse_command(adapter, model, out_dir, dequantize, quantize, force, backend, trust_remote_code):
    """Merge an adapter into its base model: a standalone Hugging Face folder that mlx-lm,
    transformers and mlxft load. A quantized base comes out de-quantized unless --quantize."""
    from mlxft.models.adapters import whole_model_folder

    backend = model_backend(backend, "fuse")
    if dequantize and quantize:
        raise UserError("--dequantize and --quantize contradict each other; give one")
    whole = whole_model_folder(adapter)
    if whole is not None:
        click.echo(f"{whole} is already a whole model (full fine-tuning): nothing to fuse; use --model {whole}")
        return
    from mlxft.backends import engine_for

    result = engine_for(backend).fuse(adapter, out_dir, model=model, quantize=int(quantize) if quantize else None,
                                      force=force, trust_remote_code=trust_remote_code)
    precision = f"{result.quantization['bits']}-bit" if result.quantization else "full precision"
    click.echo(f"fused {result.merged_modules} modules of {adapter} into {result.base_model} ({precision}): {result.out}")
    click.echo(f"checked: the fused model's logits differ from base + adapter by {result.check['fused_vs_adapted']:.1e} "
               f"of the largest on a {result.check['probe_tokens']}-token probe" + (f" ({result.check['note']})" if "note" in result.check else ""))


@cli.group("export", cls=Group)
def export_group():
    """Write a model in another format (GGUF for llama.cpp and Ollama)."""


@export_group.command("gguf")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .gguf file to write.")
@click.option("--type", "kind", type=click.Choice(["f16", "f32", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]), default="f16",
              show_default=True, help="Weight type; norms stay f32. q4_0 and the K-quants are made by llama.cpp's quantizer "
              "(pip install 'mlxft[llama-cpp]').")
@click.option("--model", default=None, help="Base model of an adapter; default: the adapter's base_model_name_or_path.")
@click.option("--adapter-only", is_flag=True, help="Write the adapter alone as llama.cpp's LoRA GGUF (--lora, Ollama's ADAPTER).")
@click.option("--base", "base_gguf", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="With --adapter-only: the base model's GGUF, certified with the adapter and named by the Modelfile's FROM.")
@click.option("--ollama", "ollama_name", default=None, help="Also write a Modelfile beside the file for `ollama create NAME`.")
@click.option("--force", is_flag=True, help="Replace an existing --out (and Modelfile).")
def export_gguf_command(source, out, kind, model, adapter_only, base_gguf, ollama_name, force):
    """SOURCE (a model folder, a run, or an adapter: fused first; with --adapter-only the adapter
    alone) as GGUF, certified in llama.cpp before it is kept when llama-cpp-python is installed."""
    from mlxft.models.export import describe, export_gguf

    if not out.name.endswith(".gguf"):
        raise UserError(f"--out {out}: name a .gguf file")
    if base_gguf and not adapter_only:
        raise UserError("--base goes with --adapter-only")
    if adapter_only and kind != "f16":
        raise UserError("--type is the model's weight type; --adapter-only writes the adapter in f32")
    click.echo(describe(export_gguf(source, out, kind, model=model, ollama_name=ollama_name, force=force,
                                    adapter_only=adapter_only, base_gguf=base_gguf, echo=click.echo)))


@cli.command("generate")
@generation_options
@sampling_options
@click.option("--prompt", required=True, help="The message (with --template alpaca: the instruction).")
@click.option("--input", "input_text", default="", help="Alpaca input that goes with the instruction.")
def generate_command(model, adapter, template, backend, trust_remote_code, system, temperature, top_p, top_k,
                     max_tokens, seed, repetition_penalty, prompt, input_text):
    """Answer one prompt, streaming the tokens as they come."""
    from mlxft.chat import stream_answer
    from mlxft.conversation import Conversation, resolve_template

    generator = load_generator(model, adapter, backend, trust_remote_code, "generate")
    conversation = Conversation(resolve_template(template, generator.tokenizer), generator.tokenizer, system)
    sampling = sampling_from(temperature, top_p, top_k, max_tokens, seed, repetition_penalty)
    stream_answer(generator, conversation.prompt(prompt, input_text), sampling, lambda text: click.echo(text, nl=False))
    click.echo()


@cli.command("chat")
@generation_options
@sampling_options
def chat_command(model, adapter, template, backend, trust_remote_code, system, temperature, top_p, top_k,
                 max_tokens, seed, repetition_penalty):
    """Talk with a model in the terminal; answers stream as they come. /reset, /input TEXT, /quit."""
    from mlxft.chat import run_chat
    from mlxft.conversation import Conversation, resolve_template

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    generator = load_generator(model, adapter, backend, trust_remote_code, "chat")
    conversation = Conversation(resolve_template(template, generator.tokenizer), generator.tokenizer, system)
    run_chat(generator, conversation, sampling_from(temperature, top_p, top_k, max_tokens, seed, repetition_penalty),
             read=input, write=lambda text: click.echo(text, nl=False))


@cli.command("serve")
@(lambda function: generation_options(function, click.option(
    "--adapter", "adapters", multiple=True, metavar="[NAME=]PATH",
    help="An adapter to serve without fusing: PATH is the one requests get by default; NAME=PATH is picked by a request's "
         "\"model\": \"NAME\". Repeat for many adapters on one base.")))
@click.option("--adapters-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Serve every subfolder holding an adapter_config.json, each named by its folder.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; loopback keeps the server private to this machine.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", default=None, envvar="MLXFT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests (or set MLXFT_API_KEY); "
              "also what allows adding and removing adapters over HTTP.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Answers generated at once (continuous batching).")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait for a place in the batch; beyond them a request gets HTTP 429.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (https://app.example) whose pages may call the API; repeat for more, '*' for any. "
                   "Off by default.")
@click.option("--prompt-cache-bytes", type=click.IntRange(min=0), default=None,
              help="Bound of the prompt cache (keys and values of answered prompts, per adapter, reused by the next request "
                   "that starts the same way); default: a tenth of this machine's memory, at most 8 GiB; 0: off. MLX only.")
@click.option("--warm-prompt", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="A text file: prefilled at start as a chat's system prompt for the model and each adapter, so that the "
                   "first chats behind it hit the prompt cache. MLX only.")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
def serve_command(model, adapters, template, backend, trust_remote_code, adapters_dir, host, port, api_key, max_batch, max_queue,
                  cors_origins, prompt_cache_bytes, warm_prompt, quiet):
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /;
    many adapters on one base, requests batched together whatever adapter they ask for."""
    from mlxft.serve.options import adapter_options, base_model_of, check_origins, is_loopback
    from mlxft.serve.server import make_server

    default, named = adapter_options(adapters, adapters_dir)
    model = model or base_model_of(default, named)
    if model_backend(backend, "serve") == "torch" and not named:
        # PyTorch serves one adapter, for every row: it is applied to the model it loads.
        generator, default = load_generator(model, default, backend, trust_remote_code, "serve"), None
    else:
        generator = load_generator(model, None, backend, trust_remote_code, "serve")
    try:
        server = make_server(generator, host=host, port=port, template=template, api_key=api_key,
                             log=None if quiet else (lambda line: click.echo(line, err=True)),
                             max_batch=max_batch, max_queue=max_queue, adapters=named, default_adapter=default,
                             cors_origins=check_origins(cors_origins), prompt_cache_bytes=prompt_cache_bytes,
                             warm_prompt=warm_prompt.read_text() if warm_prompt else None)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model", err=True)
    served = f" and {len(named)} adapters" if named else ""
    if server.warmed_tokens:
        click.echo(f"prompt cache warmed: {server.warmed_tokens} tokens of {warm_prompt.name} for each model", err=True)
    click.echo(f"serving {server.model_id}{served} at {server.url} (chat page at /, OpenAI API at /v1); Ctrl-C stops", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
