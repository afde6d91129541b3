"""Does vLLM serve what the pipeline shipped? Greedy answers through a running server against the merged model.

For each tenant, the first --rows held-out test rows of data/prepared/<tenant>: the prompt tokens
(everything before the answer) go to the server's /v1/completions as token ids with the tenant's
name as the model, temperature 0, and to models/merged/<tenant> through transformers' greedy
generate. The answers are compared as text.

Start the server first (in the serving environment), with the adapters made servable:

    python -c "from loraline.serve.adapters import make_servable; \\
               [make_servable(f'models/adapters/{t}', 'models/base', f'/tmp/servable/{t}') \\
                for t in ('acme-shop', 'globex-it')]"
    VLLM_CPU_KVCACHE_SPACE=1 .serve-venv/bin/python -m vllm.entrypoints.openai.api_server --model models/base \\
        --enable-lora --max-lora-rank 256 --max-model-len 1024 --dtype float32 --enforce-eager --port 8011 \\
        --lora-modules acme-shop=/tmp/servable/acme-shop globex-it=/tmp/servable/globex-it
    python bench/serve_parity.py --url http://127.0.0.1:8011 --tenant acme-shop --tenant globex-it --rows 100
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from loraline.modelling.constants import IGNORE_INDEX


def served(url: str, model: str, prompt: list[int], max_tokens: int) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)["choices"][0]["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8011")
    ap.add_argument("--tenant", action="append", required=True)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained("models/base")
    results = {}
    for tenant in a.tenant:
        test = datasets.load_from_disk(f"data/prepared/{tenant}/dataset")["test"]
        model = AutoModelForCausalLM.from_pretrained(f"models/merged/{tenant}", dtype=torch.float32).eval()
        same, rows = 0, min(a.rows, len(test))
        for i in range(rows):
            ids, labels = test[i]["input_ids"], test[i]["labels"]
            prompt = ids[: next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)]
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt]),
                    max_new_tokens=a.max_tokens,
                    do_sample=False,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            local = tok.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
            remote = served(a.url, tenant, prompt, a.max_tokens).strip()
            same += local == remote
            if local != remote:
                print(json.dumps({"tenant": tenant, "row": i, "merged": local, "served": remote}), flush=True)
        results[tenant] = {"rows": rows, "same": same}
    print(json.dumps({"bench": "serve_parity", "results": results}))
    print("\n| tenant | rows | served answer = merged model's |\n|---|---:|---:|")
    for tenant, r in results.items():
        print(f"| {tenant} | {r['rows']} | {r['same']} |")


if __name__ == "__main__":
    main()
