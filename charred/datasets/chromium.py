"""Screenshots of HTML pages by one long-lived headless Chromium; no TensorFlow.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
it reads JSON commands, each ended by a NUL byte, on fd 3 and answers on fd 4),
so nothing beyond the browser itself is needed (no Selenium, Playwright or
websocket client). One browser serves every page: starting it costs ~1 s, a
screenshot ~0.1 s. The executable is `$CHARRED_CHROMIUM` or the first of
`EXECUTABLES` on PATH (Debian: `apt-get install chromium`).

Before each screenshot every @font-face of the page must have loaded: Chromium
would otherwise draw the text in a system fallback font without a word (a face
the page declares but never uses stays unloaded, and fails the check too).
"""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import tempfile
from typing import Any

import numpy as np
from PIL import Image

ENV_VAR = "CHARRED_CHROMIUM"
EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Fixed rendering: no GPU, no LCD subpixel text or hinting, 1 CSS px = 1 pixel.
_FLAGS = ("--headless", "--remote-debugging-pipe", "--disable-gpu", "--hide-scrollbars",
          "--force-device-scale-factor=1", "--font-render-hinting=none", "--disable-lcd-text",
          "--allow-file-access-from-files", "--no-first-run", "--no-default-browser-check",
          "--disable-extensions", "--disable-background-networking", "--disable-sync",
          "--mute-audio")
_FONT_STATUS = ("document.fonts.ready.then(() => "
                "[...document.fonts].map(f => [f.family.replace(/\"/g, ''), f.status]))")


def find_executable() -> str:
  """Path of the Chromium executable; raises FileNotFoundError naming what was tried."""
  path = os.environ.get(ENV_VAR)
  if path:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
      raise FileNotFoundError(f"${ENV_VAR}={path!r} is not an executable file.")
    return path
  for name in EXECUTABLES:
    found = shutil.which(name)
    if found:
      return found
  raise FileNotFoundError(
      f"No Chromium found: set ${ENV_VAR} or put one of {', '.join(EXECUTABLES)} on PATH "
      "(Debian/Ubuntu: apt-get install chromium).")


class Chromium:
  """A headless Chromium with one tab; use as a context manager or call `close()`.

  Args:
    executable: the browser; `find_executable()` by default.
    timeout: seconds to wait for any one answer from the browser.
  """

  def __init__(self, executable: str | None = None, timeout: float = 60.0):
    self.executable = executable or find_executable()
    self.timeout = timeout
    self._workdir = tempfile.mkdtemp(prefix="charred_chromium_")
    flags = list(_FLAGS) + [f"--user-data-dir={self._workdir}/profile"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
      flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox.
    commands_r, self._commands = os.pipe()
    self._answers, answers_w = os.pipe()
    # Move the child's ends above fd 4, so that dup2 onto 3 and 4 cannot clobber them.
    child_r = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 10)
    child_w = fcntl.fcntl(answers_w, fcntl.F_DUPFD, 10)
    os.close(commands_r)
    os.close(answers_w)

    def child_fds():
      os.dup2(child_r, 3)
      os.dup2(child_w, 4)

    self._process = subprocess.Popen(
        [self.executable, *flags, "about:blank"], pass_fds=(3, 4), preexec_fn=child_fds,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    os.close(child_r)
    os.close(child_w)
    self._buffer, self._next_id, self._events = b"", 0, []
    self._session = None
    self._size = None
    self._pages = 0
    try:
      target = self._call("Target.createTarget", url="about:blank")["targetId"]
      self._session = self._call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
      self._call("Page.enable")
    except Exception:
      self.close()
      raise

  def __enter__(self) -> "Chromium":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def closed(self) -> bool:
    return self._process is None

  def close(self) -> None:
    """Ends the browser (its whole process group) and removes its profile."""
    if self._process is not None:
      if self._process.poll() is None:
        try:
          os.killpg(self._process.pid, signal.SIGTERM)
          self._process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
          os.killpg(self._process.pid, signal.SIGKILL)
          self._process.wait()
      for fd in (self._commands, self._answers):
        os.close(fd)
      self._process = None
    shutil.rmtree(self._workdir, ignore_errors=True)

  def screenshot(self, html: str, width: int, height: int,
                 script: str | None = None) -> tuple[np.ndarray, Any]:
    """Loads `html` in a `width` x `height` viewport and captures it.

    Args:
      html: a whole page; relative URLs resolve against a private temporary folder.
      width, height: viewport size in pixels (the image size).
      script: optional JavaScript expression evaluated after fonts have loaded
        (awaited if it is a promise); its JSON value is returned.

    Returns:
      (uint8 RGB [height, width, 3], the script's value or None).

    Raises:
      RuntimeError: an @font-face of the page did not load, or the browser failed.
    """
    if self._process is None:
      raise RuntimeError("Chromium is closed.")
    if self._size != (width, height):
      self._call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=1, mobile=False)
      self._size = (width, height)
    self._pages += 1  # A new file each time: a page is never served from a cache.
    page = pathlib.Path(self._workdir, f"page{self._pages}.html")
    page.write_text(html, encoding="utf-8")
    self._events.clear()
    self._call("Page.navigate", url=page.as_uri())
    self._wait_for_event("Page.loadEventFired")
    failed = {family: status for family, status in self._evaluate(_FONT_STATUS)
              if status != "loaded"}
    if failed:
      raise RuntimeError(f"Web fonts of the page did not load (family: status): {failed}.")
    value = self._evaluate(script) if script else None
    png = base64.b64decode(self._call("Page.captureScreenshot", format="png")["data"])
    page.unlink()
    with Image.open(io.BytesIO(png)) as image:
      pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pixels.shape != (height, width, 3):
      raise RuntimeError(f"Chromium captured {pixels.shape[:2]}, not ({height}, {width}).")
    return pixels, value

  def _evaluate(self, expression: str) -> Any:
    result = self._call("Runtime.evaluate", expression=expression, awaitPromise=True,
                        returnByValue=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"JavaScript error: {result['exceptionDetails'].get('text')} "
                         f"{result['exceptionDetails'].get('exception', {}).get('description')}")
    return result["result"].get("value")

  def _call(self, method: str, **params) -> dict[str, Any]:
    """Sends one command (to the tab once attached) and returns its result."""
    self._next_id += 1
    message = dict(id=self._next_id, method=method, params=params)
    if self._session:
      message["sessionId"] = self._session
    os.write(self._commands, json.dumps(message).encode() + b"\0")
    while True:
      answer = self._read()
      if answer.get("id") == self._next_id:
        if "error" in answer:
          raise RuntimeError(f"Chromium {method} failed: {answer['error']}")
        return answer.get("result", {})
      self._events.append(answer)

  def _wait_for_event(self, method: str) -> dict[str, Any]:
    while True:
      for i, event in enumerate(self._events):
        if event.get("method") == method:
          return self._events.pop(i)
      self._events.append(self._read())

  def _read(self) -> dict[str, Any]:
    while b"\0" not in self._buffer:
      ready, _, _ = select.select([self._answers], [], [], self.timeout)
      chunk = os.read(self._answers, 1 << 20) if ready else None
      if not chunk:
        code = self._process.poll()
        raise RuntimeError(f"Chromium ({self.executable}) "
                           + ("did not answer in time." if chunk is None
                              else f"exited with code {code}."))
      self._buffer += chunk
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)
