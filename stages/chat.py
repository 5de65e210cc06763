"""An OpenAI-compatible chat endpoint (a vLLM server, llama.cpp's, OpenAI's): POST {url}/chat/completions with
the standard library. Timeouts, refused connections and HTTP 429 / 5xx are retried; every failure ends as one
`EndpointError` line naming the request, what went wrong and after how many attempts."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np


class EndpointError(RuntimeError):
    """The endpoint did not answer with a chat completion (timeout, HTTP error, malformed reply)."""


@dataclass(frozen=True)
class ChatEndpoint:
    url: str                          # base URL, e.g. http://localhost:8000/v1
    model: str                        # the served model's name, e.g. Qwen/Qwen2.5-VL-7B-Instruct
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (none set: no header)
    timeout_s: float = 60.0
    retries: int = 2                  # further attempts after a transient failure
    backoff_s: float = 1.0            # wait before retry n: backoff_s * 2**n
    max_tokens: int = 512

    def complete(self, content: list[dict], *, temperature: float = 0.7, seed: int | None = None,
                 request_id: str = "") -> str:
        """The reply's text to one user message of `content` parts (text, image_url)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": temperature, "max_tokens": self.max_tokens}
        if seed is not None:
            body["seed"] = seed  # vLLM and OpenAI accept it: a rerun gets the same reply where the server allows
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        if request_id:
            headers["X-Request-Id"] = request_id  # the server's logs can name the unit
        where = f"{self.url.rstrip('/')}/chat/completions" + (f" ({request_id})" if request_id else "")
        request = urllib.request.Request(f"{self.url.rstrip('/')}/chat/completions", json.dumps(body).encode(),
                                         headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                problem, transient = f"HTTP {e.code} {e.reason}", e.code == 429 or e.code >= 500
            except TimeoutError:
                problem, transient = f"timed out after {self.timeout_s:g} s", True
            except urllib.error.URLError as e:
                timeout = isinstance(e.reason, TimeoutError)
                problem = f"timed out after {self.timeout_s:g} s" if timeout else f"cannot connect ({e.reason})"
                transient = True
            if not transient or attempt == self.retries:
                raise EndpointError(f"{where}: {problem} (attempt {attempt + 1} of {self.retries + 1})")
            time.sleep(self.backoff_s * 2 ** attempt)
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"{where}: malformed reply, not a chat completion: {raw[:60]!r}") from None
        if not isinstance(text, str):
            raise EndpointError(f"{where}: malformed reply, message content is {type(text).__name__}, not text")
        return text


NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,2}[.):]|\d{1,2}\s+-)\s*")


def parse_lines(text: str, k: int) -> list[str]:
    """Up to k captions from a reply: one per line, list numbering, bullets and quotes stripped."""
    lines = [NUMBERING.sub("", line).strip().strip('"\u201c\u201d').strip() for line in text.splitlines()]
    return [line for line in lines if line][:k]


def jpeg_part(frame: np.ndarray, quality: int = 85) -> dict:
    """An image_url content part: one RGB uint8 frame as a base64 JPEG data URL."""
    from PIL import Image  # Pillow: a dependency of matplotlib

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}
