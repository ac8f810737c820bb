"""The `kiln` command line: quick generation and chat from a terminal."""

import argparse
import logging
import sys


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="HF folder, .gguf file or hub id (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--eager", action="store_true", help="run without torch.compile")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Offline LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete one or more prompts")
    generate.add_argument("prompts", nargs="+")
    _add_common(generate)
    chat = commands.add_parser("chat", help="answer one user message with the chat template")
    chat.add_argument("message")
    chat.add_argument("--system", default=None, help="system message")
    _add_common(chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    from . import LLM, SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                seed=args.seed, stop=args.stop)
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  enforce_eager=args.eager)
        if args.command == "generate":
            outputs = llm.generate(args.prompts, params, use_tqdm=False)
            for prompt, out in zip(args.prompts, outputs):
                print(prompt + out.outputs[0].text)
        else:
            messages = [{"role": "user", "content": args.message}]
            if args.system:
                messages.insert(0, {"role": "system", "content": args.system})
            print(llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text)
    except (ValueError, TypeError, OSError) as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
