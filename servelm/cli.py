"""`servelm serve | generate | chat | bench`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional


def _add_generate(sub) -> None:
    from servelm.config import EngineArgs
    p = sub.add_parser("generate", help="offline generation for prompts (arguments or JSONL)")
    EngineArgs.add_cli_args(p, model_positional=False)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--input", help="JSONL file: each line {'prompt': str | [ids], optional "
                                   "sampling fields} or {'messages': [...]} for chat")
    p.add_argument("--output", help="JSONL file to write (default: stdout)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--no-tqdm", action="store_true")
    p.set_defaults(func=_main_generate)


def _main_generate(args: argparse.Namespace) -> int:
    from servelm import LLM, SamplingParams
    from servelm.config import EngineArgs
    from dataclasses import fields
    rows = [{"prompt": p} for p in args.prompt]
    if args.input:
        with open(args.input) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError("give prompts with --prompt TEXT or --input FILE.jsonl")
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, ignore_eos=args.ignore_eos, n=args.n)
    sp_fields = {f.name for f in fields(SamplingParams)}
    params = [SamplingParams(**{**base, **{k: v for k, v in r.items() if k in sp_fields}})
              for r in rows]
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    t0 = time.perf_counter()
    chat_rows = [i for i, r in enumerate(rows) if "messages" in r or args.chat]
    outs: list = [None] * len(rows)
    plain = [i for i in range(len(rows)) if i not in set(chat_rows)]
    if plain:
        for i, o in zip(plain, llm.generate([rows[i]["prompt"] for i in plain],
                                            [params[i] for i in plain], use_tqdm=not args.no_tqdm)):
            outs[i] = o
    if chat_rows:
        convs = [rows[i].get("messages") or [{"role": "user", "content": rows[i]["prompt"]}]
                 for i in chat_rows]
        for i, o in zip(chat_rows, llm.chat(convs, [params[i] for i in chat_rows],
                                            use_tqdm=not args.no_tqdm)):
            outs[i] = o
    elapsed = time.perf_counter() - t0
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    sink = open(args.output, "w") if args.output else sys.stdout
    try:
        for o in outs:
            sink.write(json.dumps({
                "request_id": o.request_id, "prompt": o.prompt,
                "prompt_tokens": len(o.prompt_token_ids),
                "outputs": [{"text": c.text, "token_ids": c.token_ids,
                             "finish_reason": c.finish_reason} for c in o.outputs],
                "ttft_s": None if o.metrics.first_token_time is None
                else o.metrics.first_token_time - o.metrics.arrival_time,
                "e2e_s": (o.metrics.finished_time or 0) - o.metrics.arrival_time,
            }, ensure_ascii=False) + "\n")
    finally:
        if sink is not sys.stdout:
            sink.close()
    print(f"{len(outs)} requests, {n_out} output tokens in {elapsed:.2f}s: "
          f"{n_out / elapsed:.1f} output tok/s", file=sys.stderr)
    return 0



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servelm", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    from servelm.cli_parser import SubcommandParser  # unknown flags: the subcommand's usage
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    _add_generate(sub)
    try:
        from servelm.server.cli import add_serve_parser
        add_serve_parser(sub)
    except ImportError as e:
        _missing(sub, "serve", e)
    try:
        from servelm.server.chat_cli import add_chat_parser
        add_chat_parser(sub)
    except ImportError as e:
        _missing(sub, "chat", e)
    bench = sub.add_parser("bench", help="benchmarks: serve | throughput | latency | perplexity")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    from servelm.bench.serve import add_serve_args
    bp = bsub.add_parser("serve", help="load-test an OpenAI-compatible server")
    add_serve_args(bp)
    bp.set_defaults(func=_main_bench_serve)
    from servelm.bench.offline import add_offline_parsers
    add_offline_parsers(bsub)
    from servelm.bench.perplexity import add_perplexity_args, main_perplexity
    pp = bsub.add_parser("perplexity", help="perplexity, KL and top-1 agreement of engine "
                                            "configurations on a fixed text")
    add_perplexity_args(pp)
    pp.set_defaults(func=main_perplexity)
    return parser


def _missing(sub, name: str, err: ImportError) -> None:
    p = sub.add_parser(name, help=f"(unavailable: {err})")

    def fail(_args):
        raise ValueError(f"`servelm {name}` needs a missing dependency ({err}); "
                         "install servelm[all].")
    p.set_defaults(func=fail)


def _main_bench_serve(args: argparse.Namespace) -> int:
    from servelm.bench.serve import main_serve
    main_serve(args)
    return 0


def _prestart_core(argv: list[str]):
    """For `servelm serve`, its engine core process, started before anything heavy is imported
    here: both processes then import torch and the model's config at once
    (engine/core_launcher.py). None for other commands."""
    rest = list(argv)
    while rest and rest[0].startswith("-"):  # the top-level options: --log-level X
        rest = rest[2:] if rest[0] == "--log-level" else rest[1:]
    if not rest or rest[0] != "serve":
        return None
    from servelm.engine.core_launcher import CoreLauncher
    return CoreLauncher.for_serve_argv(rest[1:])


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher = _prestart_core(argv)
    try:
        args = build_parser().parse_args(argv)
        args.core_launcher = launcher
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args) or 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if launcher is not None:
            launcher.close()  # if the server never took it


if __name__ == "__main__":
    sys.exit(main())
