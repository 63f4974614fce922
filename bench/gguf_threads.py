"""Why each GGUF replica owns one thread: llama.cpp's per-calling-thread worker teams.

Run: ``.venv/bin/python -m bench.gguf_threads [--threads 2]``.  Not a test.

Two ``Llama`` objects on SmolLM2 in one process.  Tokens/s of greedy 128-token completions on
the main thread (best of 3): alone; while a second OS thread that has called llama.cpp once is
still alive (idle, blocked on an event); and after that thread exited.  With an OpenMP build
(llama-cpp-python's default) the second live thread's worker team makes every decode step pay
wake-ups; run the same script in an environment whose wheel was built with
``-DGGML_OPENMP=OFF`` (ggml's own thread pool) to compare builds.
"""

from __future__ import annotations

import argparse
import threading
import time

from bench.gguf_pool import smollm2_path

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    import llama_cpp

    def new() -> llama_cpp.Llama:
        n = args.threads
        return llama_cpp.Llama(model_path=str(smollm2_path()), n_ctx=1024, n_threads=n, n_threads_batch=n, verbose=False)

    def rate(llm: llama_cpp.Llama, tokens: int = args.tokens) -> float:
        llm.reset()
        t0 = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, top_k=1, min_p=0.0)
        return out["usage"]["completion_tokens"] / (time.perf_counter() - t0)  # type: ignore[index]

    main_llm, other_llm = new(), new()
    rate(main_llm, 8)
    alone = max(rate(main_llm) for _ in range(3))
    stop, called = threading.Event(), threading.Event()

    def other() -> None:
        rate(other_llm, 8)  # this thread has called llama.cpp ...
        called.set()
        stop.wait()  # ... and stays alive, idle

    thread = threading.Thread(target=other)
    thread.start()
    called.wait()
    with_other = max(rate(main_llm) for _ in range(3))
    stop.set()
    thread.join()
    after = max(rate(main_llm) for _ in range(3))
    system_info = llama_cpp.llama_print_system_info().decode()
    openmp = "OPENMP = 1" in system_info
    print(f"# llama.cpp calling threads (threads={args.threads}, tokens={args.tokens}, OpenMP build: {openmp})")
    print(f"main thread alone, tok/s                          {alone:7.1f}")
    print(f"a second calling thread alive (idle), tok/s       {with_other:7.1f}  ({with_other / alone:.2f}x)")
    print(f"after that thread exited, tok/s                   {after:7.1f}  ({after / alone:.2f}x)")
    main_llm.close()
    other_llm.close()


if __name__ == "__main__":
    main()
