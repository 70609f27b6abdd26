"""The real vLLM engine (CPU) with kvfs.vllm_connector.KvfsConnector on a directory. Run by
scripts/integration-vllm-kvfs.sh with vLLM's interpreter:

    python vllm_kvfs_roundtrip.py model DIR             a tiny random-weight Llama, built offline
    python vllm_kvfs_roundtrip.py run MODEL ROOT [--no-connector] [--timing]
    python vllm_kvfs_roundtrip.py zero ROOT             overwrite every stored chunk's K/V with zeros

`run` starts one engine (a fresh process each time), generates greedily for PROMPTS and
prints one JSON line: the output token ids, vLLM's prefix-cache counters (its own and the
connector's external hits), the chunk files under ROOT and, with --timing, the time to the
first token of the first prompt loaded from kvfs and of the same prompt recomputed
(skip_reading_prefix_cache) in the same engine, after a warm-up.
"""

import json
import os
import sys
import time

PROMPT_LEN = 600
CHUNK = 128
BLOCK = 32  # what vLLM's CPU attention wants


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(1234)
    a = [rng.randrange(1, 1000) for _ in range(PROMPT_LEN)]
    b = [rng.randrange(1, 1000) for _ in range(PROMPT_LEN - 77)]
    c = a[:300] + [rng.randrange(1, 1000) for _ in range(200)]  # shares a's first 2 chunks
    return [a, b, c]


def make_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      initializer_range=0.2, torch_dtype="bfloat16")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    print(json.dumps({"model": path}))


def chunk_files(root: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".kv")]
    return sorted(out)


def run(model: str, root: str, connector: bool, timing: bool) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (else most of the memory)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = {}
    if connector:
        kw["kv_transfer_config"] = {
            "kv_connector": "KvfsConnector", "kv_connector_module_path": "kvfs.vllm_connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"root": root, "chunk_tokens": CHUNK}}
    llm = LLM(model=model, skip_tokenizer_init=True, block_size=BLOCK, max_model_len=2048, dtype="bfloat16",
              enforce_eager=True, disable_log_stats=False, seed=0, **kw)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    result = {}
    ps = prompts()
    if timing:
        warm = [7] * PROMPT_LEN  # compiles and warms everything a prompt of this size uses
        llm.generate([TokensPrompt(prompt_token_ids=warm)], SamplingParams(max_tokens=1), use_tqdm=False)
        one = SamplingParams(max_tokens=1, temperature=0)
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ps[0])], one, use_tqdm=False)
        result["ttft_cached_s"] = time.perf_counter() - t
        again = SamplingParams(max_tokens=1, temperature=0, skip_reading_prefix_cache=True)
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ps[0])], again, use_tqdm=False)
        result["ttft_recomputed_s"] = time.perf_counter() - t
    outs = []
    for p in ps:  # one at a time: the third one's prefix is the first one's
        out = llm.generate([TokensPrompt(prompt_token_ids=p)], greedy, use_tqdm=False)
        outs.append(list(out[0].outputs[0].token_ids))
    result["outputs"] = outs
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    result.update({k.split(":")[1]: v for k, v in metrics.items() if "prefix_cache" in k})
    del llm
    import gc

    gc.collect()
    result["chunk_files"] = len(chunk_files(root)) if root and os.path.isdir(root) else 0
    print(json.dumps(result), flush=True)


def zero(root: str) -> None:
    """Overwrite every K/V tensor of every chunk file in place with zeros (the tokens and the
    header stay): a load that really uses the files then changes the output."""
    from kvfs.kv import open_chunk

    files = chunk_files(root)
    for path in files:
        chunk = open_chunk(path)
        spans = [(t.offset, t.nbytes) for name, t in chunk.tensors.items() if name != "tokens"]
        del chunk
        with open(path, "r+b") as f:
            for offset, n in spans:
                f.seek(offset)
                f.write(bytes(n))
    print(json.dumps({"zeroed": len(files)}))


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "model":
        make_model(sys.argv[2])
    elif cmd == "run":
        run(sys.argv[2], sys.argv[3], "--no-connector" not in sys.argv, "--timing" in sys.argv)
    elif cmd == "zero":
        zero(sys.argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
