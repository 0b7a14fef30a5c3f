"""Talk to `lazyllm-mlx serve` with plain urllib, and with the `openai` client if it is installed.

    lazyllm-mlx serve &                   # listens on http://127.0.0.1:8080
    python examples/server_client.py [--url http://127.0.0.1:8080]

The extra request field "lazy" picks the schedule per request ("paper", "none", a schedule string,
or null for plain mlx-lm); responses carry our figures in the non-standard "lazyllm" field.
"""

import argparse
import json
import urllib.request


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode())
    request.add_header("Content-Type", "application/json")
    return urllib.request.urlopen(request, timeout=600)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    base = parser.parse_args().url.rstrip("/")

    with urllib.request.urlopen(f"{base}/v1/models") as response:
        model = json.load(response)["data"][0]["id"]
    print(f"model: {model}")

    # One answer, whole.
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30,
        # no "lazy": the server's schedule ("default" leaves prompts under 256 tokens unpruned)
    }
    with post(f"{base}/v1/chat/completions", chat) as response:
        body = json.load(response)
    print("answer:", body["choices"][0]["message"]["content"])
    print("usage:", body["usage"], "\nlazyllm:", body["lazyllm"])

    # The same question again, streamed: the server reuses the cached prompt.
    with post(f"{base}/v1/chat/completions", {**chat, "stream": True}) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue  # blank separators and ": prefill" keep-alive comments
            chunk = json.loads(line[len("data: ") :])
            print(chunk["choices"][0]["delta"].get("content", ""), end="", flush=True)
            if "lazyllm" in chunk:
                print(f"\nreused {chunk['lazyllm']['reused_tokens']} cached prompt tokens")

    try:
        from openai import OpenAI
    except ImportError:
        print("(pip install openai to try the official client too)")
        return
    client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")
    stream = client.chat.completions.create(
        model=model,
        messages=chat["messages"],
        max_tokens=30,
        stream=True,
        extra_body={"lazy": "none"},  # our per-request schedule field
    )
    print("openai client:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))


if __name__ == "__main__":
    main()
