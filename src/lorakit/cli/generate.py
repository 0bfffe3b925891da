"""lorakit generate --model M [--adapter DIR] [--prompt TEXT]: one answer, or an interactive chat."""

from __future__ import annotations

from .common import load, model_args


def add(sub) -> None:
    g = sub.add_parser("generate", help="generate text; with no --prompt, an interactive chat")
    model_args(g)
    g.add_argument("--prompt", help="a user message; omit for an interactive chat (empty line or Ctrl-D ends)")
    g.add_argument("--max-new-tokens", type=int, default=256)


def run(args) -> int:
    from ..eval.generation import generate
    model, tokenizer = load(args)
    if args.prompt is not None:
        print(generate(model, tokenizer, [[{"role": "user", "content": args.prompt}]], args.max_new_tokens)[0])
        return 0
    history = []
    print("lorakit chat: type a message; an empty line or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [history], args.max_new_tokens)[0].strip()
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0
