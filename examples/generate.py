"""Generate text with a saved Performer, printing tokens as they are produced.

    python examples/generate.py --model_name_or_path runs/performer-pydoc --prompt "The with statement"
    python examples/generate.py --model_name_or_path your-username/performer-pydoc --trust_remote_code  # the Hub

Decoding runs on the recurrent PerformerCache: every new token costs the same, however long the text already is.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, set_seed

try:
    import hf_performer  # noqa: F401  (registers the model locally; without it, pass --trust_remote_code)
except ImportError:
    hf_performer = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", help="a saved model directory or a Hub id")
    parser.add_argument("model", nargs="?", help="the same, as a positional argument")
    parser.add_argument("--prompt", default="The with statement")
    parser.add_argument("--max_new_tokens", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top_k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run the modeling code shipped with the checkpoint (needed where hf_performer is absent)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if (args.model is None) == (args.model_name_or_path is None):
        parser.error("give the model once: --model_name_or_path PATH_OR_HUB_ID (or PATH_OR_HUB_ID alone)")
    args.model = args.model or args.model_name_or_path
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code or None)
    model.to(args.device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k) if args.temperature > 0 else \
        dict(do_sample=False)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)


if __name__ == "__main__":
    main()
