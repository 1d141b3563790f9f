#!/usr/bin/env python3
"""stasis code interpreter: the server behind the SDK's `run_code` / `runCode`.

It listens on port 49999 (the SDK's JUPYTER_PORT) inside a sandbox and speaks
exactly what novita-sandbox 2.1.1's `code_interpreter` client sends and parses:

  POST   /execute                 {"code", "context_id", "language", "env_vars"}
                                  -> newline-delimited JSON, streamed:
                                     {"type": "stdout"|"stderr", "text", "timestamp"}
                                     {"type": "result", <formats>, "is_main_result"}
                                     {"type": "error", "name", "value", "traceback"}
                                     {"type": "number_of_executions", "execution_count"}
                                     {"type": "end_of_execution"}
  POST   /contexts                {"language", "cwd"} -> {"id", "language", "cwd"}
  GET    /contexts                -> [{"id", "language", "cwd"}, ...]
  DELETE /contexts/{id}           -> 204
  POST   /contexts/{id}/restart   -> 204
  GET    /health                  -> 200 "OK"

Python contexts are IPython kernels driven through jupyter_client (Debian's
python3-jupyter-client and python3-ipykernel); bash contexts are one
long-lived bash process each, so `cd`, variables and functions persist between
calls, as they do in a terminal. A context's state lives in its process, so it
survives a sandbox pause like every other process.

Executions in one context run one at a time, in order. An execution ends when
its kernel is idle again; if the client goes away first (it disconnected or
its read timeout expired), the kernel is interrupted, not killed, so the
context keeps its variables and the next call works. A kernel that dies
(`os._exit(1)`) gives the running execution an error and is restarted by the
next call to that context.

Standard library only, besides jupyter_client; no web framework.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_PORT = 49999
# Bodies of /execute and /contexts are JSON documents of code; 64 MiB is far
# beyond any cell and keeps a hostile client from exhausting memory.
MAX_BODY = 64 << 20
# How often a waiting execution looks at its client's socket and its kernel.
POLL_SECONDS = 0.25
# A kernel starts in about a second natively; under nested emulation on a
# loaded host (tests/linux_interpreter.rs) it took more than two minutes.
KERNEL_START_TIMEOUT = float(os.environ.get("STASIS_KERNEL_START_TIMEOUT", "600"))
LANGUAGE_ALIASES = {"python": "python", "python3": "python", "py": "python",
                    "bash": "bash", "sh": "bash", "shell": "bash"}

# Jupyter MIME types -> the field names of the SDK's `Result`.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    # Set by the formatters this script installs in each kernel.
    "application/vnd.stasis.chart+json": "chart",
    "application/vnd.stasis.data+json": "data",
}


STREAM_PIECE = 256 << 10


def split_text(text: str) -> list:
    """Cuts stream text into pieces of at most STREAM_PIECE characters, at
    line ends where there are any."""
    pieces = []
    while len(text) > STREAM_PIECE:
        cut = text.rfind("\n", 0, STREAM_PIECE) + 1 or STREAM_PIECE
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return pieces


def now_ns() -> int:
    return time.time_ns()


class ApiError(Exception):
    """An error answered to the client as {"code", "message"} with a status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The HTTP client disconnected while its execution was running."""


def result_message(data: dict, is_main: bool) -> dict:
    """A Jupyter display bundle as the SDK's `result` line."""
    out: dict = {"type": "result", "is_main_result": is_main}
    extra = {}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field:
            out[field] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


class Sink:
    """Writes the lines of one streamed response; notices a client that left."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler = handler
        self.sock: socket.socket = handler.connection

    def send(self, msg: dict) -> None:
        line = (json.dumps(msg) + "\n").encode()
        try:
            self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.handler.wfile.flush()
        except OSError as e:
            raise ClientGone() from e

    def close(self) -> None:
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
            self.handler.wfile.flush()
        except OSError:
            pass

    def gone(self) -> bool:
        """True once the client has closed its side (EOF) or reset it."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


# --- inside each python kernel ---------------------------------------------
# A python context's kernel imports this file (by path, as a module: nothing
# below the `__main__` guard runs there) and calls install_kernel_hooks, so
# the hooks see the live objects a cell displays:
#   - formatters: each displayed matplotlib Figure (plt.show(), a figure as
#     the cell's value, display(fig)) gets, next to its png, the chart
#     metadata the SDK parses into `Result.chart`; a DataFrame gets its
#     columns as `Result.data`; a string result's text is the string itself;
#   - PIL images a cell shows (`Image.show()`) or saves (`Image.save(path)`)
#     come back as png results (there is no screen in a sandbox).
# A hook that fails logs to the kernel's stderr (the server's log) and is
# left out; the cell, and its png, never see the failure.

CHART_MIME = "application/vnd.stasis.chart+json"
DATA_MIME = "application/vnd.stasis.data+json"
# A DataFrame's `data` goes up to this many cells, a chart up to this many
# points (a larger one is left out, logged; its png goes as ever).
MAX_DATA_CELLS = 1_000_000
MAX_CHART_POINTS = 1_000_000
# Units are the text in the last parentheses (or brackets) of an axis label:
# "Time (s)" -> "s", "Y-axis (log scale)" -> "log scale".
_UNIT_RE = re.compile(r"[(\[]([^()\[\]]+)[)\]]")


def _kernel_log(what: str) -> None:
    try:
        sys.__stderr__.write(f"stasis-interpreter kernel: {what}\n")
        sys.__stderr__.flush()
    except Exception:  # noqa: BLE001 - logging must not fail a cell
        pass


def install_kernel_hooks(ip) -> None:
    for hook in (_install_formatters, _install_pil_hooks):
        try:
            hook(ip)
        except Exception:  # noqa: BLE001
            import traceback
            _kernel_log(f"{hook.__name__} failed:\n{traceback.format_exc()}")


def _install_formatters(ip) -> None:
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    def by_class_name(mime, module, name, convert):
        class Formatter(BaseFormatter):
            """A JSON object for instances of one class, named, not imported:
            the cell imports matplotlib or pandas, if ever. (Not a type
            printer either: activating matplotlib's inline backend pops every
            formatter's Figure printer.)"""

            format_type = Unicode(mime)
            print_method = ObjectName("_repr_stasis_none_")
            _return_type = (dict,)

            def __call__(self, obj):
                # Never raises: DisplayFormatter.format would re-raise, and
                # the cell's display (its png too) would fail.
                try:
                    if self.enabled and any(c.__name__ == name and str(getattr(c, "__module__", "")).startswith(module)
                                            for c in type(obj).__mro__):
                        return convert(obj)
                except Exception as e:  # noqa: BLE001
                    _kernel_log(f"{mime} of a {type(obj).__name__} failed: {e!r}")
                return None

        ip.display_formatter.formatters[mime] = Formatter(parent=ip.display_formatter)
        active = list(ip.display_formatter.active_types)
        if mime not in active:
            ip.display_formatter.active_types = active + [mime]

    # By package: pandas 3 says `pandas` where 1.5 says `pandas.core.frame`.
    by_class_name(CHART_MIME, "matplotlib", "Figure", figure_chart)
    by_class_name(DATA_MIME, "pandas", "DataFrame", dataframe_data)
    # A string result is its text, not its repr: `os.getenv('FOO')` reads
    # `bar`, as the SDK's tests expect, not `'bar'`. Only the result itself:
    # a string inside a container keeps its quotes (`('a', ['b'])`). The
    # printer's stack holds the objects being printed, the string included.
    ip.display_formatter.formatters["text/plain"].for_type(
        str, lambda s, p, cycle: p.text(s if len(p.stack) == 1 else repr(s)))


def dataframe_data(df):
    """A DataFrame's columns as {name: [values]} (the SDK's `Result.data`),
    or None for one too large to send twice (its html goes anyway)."""
    try:
        if df.size > MAX_DATA_CELLS:
            return None
        split = json.loads(df.to_json(orient="split", date_format="iso"))
        columns = [str(c) for c in split["columns"]]
        return {c: [row[i] for row in split["data"]] for i, c in enumerate(columns)}
    except Exception:  # noqa: BLE001 - the data is extra; the table still goes
        import traceback
        _kernel_log(f"DataFrame data failed:\n{traceback.format_exc()}")
        return None


def _install_pil_hooks(ip) -> None:
    try:
        from PIL import Image, ImageShow
    except ImportError:
        return
    from IPython.display import display

    def display_image(image) -> bool:
        # The png made here, not by IPython's formatter: one that fails
        # there is a traceback in the cell's output.
        import base64
        try:
            png = image._repr_png_()
        except Exception as e:  # noqa: BLE001
            _kernel_log(f"an image not displayed: {e!r}")
            return False
        if not png:
            return False
        display({"image/png": base64.b64encode(png).decode(), "text/plain": repr(image)}, raw=True)
        return True

    class NotebookViewer(ImageShow.Viewer):
        """`Image.show()` displays the image as the cell's output."""

        def show(self, image, **options):
            return 1 if display_image(image) else 0

    ImageShow.register(NotebookViewer(), order=0)

    original_save = Image.Image.save
    if getattr(original_save, "_stasis", False):
        return

    def save(self, fp, *args, **kwargs):
        result = original_save(self, fp, *args, **kwargs)
        # Only the cell's own saves to a file: matplotlib and PIL save
        # through this too (to buffers, or from their modules).
        caller = sys._getframe(1).f_globals.get("__name__")
        if caller == "__main__" and isinstance(fp, (str, bytes, os.PathLike)):
            display_image(self)
        return result

    save._stasis = True
    save.__doc__ = original_save.__doc__
    Image.Image.save = save


def figure_chart(fig):
    """The SDK's chart dict for a matplotlib Figure, or None."""
    try:
        return _figure_chart(fig)
    except Exception:  # noqa: BLE001 - a chart is extra; the png still goes
        import traceback
        _kernel_log(f"chart extraction failed:\n{traceback.format_exc()}")
        return None


def _figure_chart(fig):
    axes = [ax for ax in fig.get_axes()
            if ax.get_visible() and getattr(ax, "_colorbar", None) is None]
    if not axes:
        return None
    suptitle = getattr(fig, "_suptitle", None)
    suptitle = (suptitle.get_text() if suptitle is not None else "") or None
    if len(axes) == 1:
        chart = _axes_chart(axes[0])
        if chart["title"] is None:
            chart["title"] = suptitle
        return chart
    return {"type": "superchart", "title": suptitle, "elements": [_axes_chart(ax) for ax in axes]}


def _axes_chart(ax) -> dict:
    title = ax.get_title() or ax.get_title("left") or ax.get_title("right") or None
    for build in (_pie_chart, _bar_chart, _box_chart, _point_chart):
        chart = build(ax)
        if chart is not None:
            chart["title"] = title
            return chart
    return {"type": "unknown", "title": title, "elements": []}


# -- values -----------------------------------------------------------------

def _number(v):
    """A JSON number (NaN and infinities, which JSON lacks, become null)."""
    import math
    v = float(v)
    return v if math.isfinite(v) else None


def _public_label(artist) -> str:
    """An artist's label; matplotlib's automatic `_child0`-style ones are ''."""
    label = artist.get_label()
    label = "" if label is None else str(label)
    return "" if label.startswith("_") else label


def _axis_kind(axis) -> str:
    """'datetime', 'categorical' or matplotlib's scale name for an axis."""
    from matplotlib import category, dates
    get_converter = getattr(axis, "get_converter", None)
    converter = get_converter() if get_converter else getattr(axis, "converter", None)
    locator = axis.get_major_locator()
    if isinstance(locator, category.StrCategoryLocator) or isinstance(converter, category.StrCategoryConverter):
        return "categorical"
    if isinstance(locator, dates.DateLocator) or "date" in type(converter).__name__.lower():
        return "datetime"
    return axis.get_scale()


def _axis_value(axis, kind, v):
    """A data value (in matplotlib's converted units) as the chart gives it:
    datetimes as ISO strings, categories as their names, numbers as floats."""
    if kind == "datetime":
        from matplotlib import dates
        n = _number(v)
        return None if n is None else dates.num2date(n).isoformat()
    if kind == "categorical":
        names = _category_names(axis)
        try:
            i = int(round(float(v)))
        except (TypeError, ValueError):
            return str(v)
        if 0 <= i < len(names) and abs(float(v) - i) < 1e-9:
            return names[i]
    return _number(v)


def _category_names(axis) -> list:
    units = axis.get_units()
    mapping = getattr(units, "_mapping", None) or {}
    return [str(name) for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _ticks(axis):
    """The major ticks in view and their labels as drawn."""
    lo, hi = sorted(axis.get_view_interval())
    slack = (hi - lo) * 1e-9
    locs = [float(v) for v in axis.get_majorticklocs() if lo - slack <= v <= hi + slack]
    labels = [str(t) for t in axis.get_major_formatter().format_ticks(locs)]
    return locs, labels


def _label_at(axis, value) -> str:
    """The tick label at a position (a bar's or box's category)."""
    locs, labels = _ticks(axis)
    for loc, label in zip(locs, labels):
        if abs(loc - value) <= 1e-9 * max(1.0, abs(value)):
            return label
    kind = _axis_kind(axis)
    named = _axis_value(axis, kind, value)
    return named if isinstance(named, str) else f"{value:g}"


def _two_d(ax, kind: str) -> dict:
    chart = {"type": kind, "title": None}
    for name, axis, label in (("x", ax.xaxis, ax.get_xlabel()), ("y", ax.yaxis, ax.get_ylabel())):
        units = _UNIT_RE.findall(label or "")
        chart[f"{name}_label"] = label or None
        chart[f"{name}_unit"] = units[-1].strip() if units else None
    return chart


# -- chart kinds ------------------------------------------------------------

def _pie_chart(ax):
    from matplotlib.patches import Wedge
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if not wedges or len(wedges) != len(ax.patches):
        return None
    return {"type": "pie", "title": None, "elements": [
        # Rounded: older matplotlib (Debian's 3.6) computes the fractions in
        # float32, so a 90% wedge spans 323.999991 degrees.
        {"label": _public_label(w), "angle": round(abs(w.theta2 - w.theta1), 4), "radius": _number(w.r)}
        for w in wedges]}


def _bar_chart(ax):
    from matplotlib.container import BarContainer
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    if not containers:
        return None
    chart = _two_d(ax, "bar")
    elements = []
    for c in containers:
        horizontal = getattr(c, "orientation", "vertical") == "horizontal"
        group = _public_label(c)
        for rect in c.patches:
            if horizontal:
                at, value, axis = rect.get_y() + rect.get_height() / 2, rect.get_width(), ax.yaxis
            else:
                at, value, axis = rect.get_x() + rect.get_width() / 2, rect.get_height(), ax.xaxis
            elements.append({"label": _label_at(axis, at), "group": group, "value": _number(value)})
    chart["elements"] = elements
    return chart


def _box_chart(ax):
    """A boxplot, recognised by its geometry: a rectangle per box (a patch,
    or a closed 5-point line), a median across it, whiskers from its middle."""
    import numpy as np
    from matplotlib.patches import PathPatch
    rects, segments, markers = [], [], []
    for p in ax.patches:
        if isinstance(p, PathPatch):
            rects.append(np.asarray(p.get_path().vertices, dtype=float))
    for line in ax.get_lines():
        xy = np.asarray(line.get_xydata(), dtype=float)
        if line.get_linestyle() in ("None", "none", "", " ") and line.get_marker() not in (None, "None", "none", ""):
            markers.append(xy)
        elif len(xy) == 5 and np.allclose(xy[0], xy[-1]):
            rects.append(xy)
        elif len(xy) == 2:
            segments.append(xy)
    if not rects:
        return None
    for flip in (False, True):
        found = _boxes(rects, segments, markers, flip)
        if found:
            break
    else:
        return None
    chart = _two_d(ax, "box_and_whisker")
    axis = ax.yaxis if flip else ax.xaxis
    chart["elements"] = [dict(label=_label_at(axis, at), **stats) for at, stats in found]
    return chart


def _boxes(rects, segments, markers, flip):
    """(position, stats) per box, or None if the shapes are not boxplots.
    flip: horizontal boxes (the roles of x and y swapped)."""
    import numpy as np

    def xy(a):
        return a[:, ::-1] if flip else a

    def close(a, b, scale):
        return abs(a - b) <= 1e-6 * max(1.0, scale)

    found = []
    for r in rects:
        r = xy(r)
        x0, x1 = float(r[:, 0].min()), float(r[:, 0].max())
        q1, q3 = float(r[:, 1].min()), float(r[:, 1].max())
        if len(r) < 4 or not all(close(v, x0, x1) or close(v, x1, x1) for v in r[:, 0]):
            return None
        width, mid = x1 - x0, (x0 + x1) / 2
        scale = max(abs(q1), abs(q3), abs(x1))
        median, low, high = None, q1, q3
        for s in (xy(s) for s in segments):
            (ax_, ay), (bx, by) = s
            if close(ay, by, scale) and close(min(ax_, bx), x0, scale) and close(max(ax_, bx), x1, scale) \
                    and q1 - 1e-9 <= ay <= q3 + 1e-9 and median is None and width > 0:
                median = float(ay)
            elif close(ax_, mid, scale) and close(bx, mid, scale):
                ends = sorted((float(ay), float(by)))
                if close(ends[1], q1, scale):
                    low = ends[0]
                elif close(ends[0], q3, scale):
                    high = ends[1]
        if median is None:
            return None
        outliers = []
        for m in markers:
            m = xy(m)
            if len(m) and all(close(v, mid, scale) for v in m[:, 0]):
                outliers.extend(float(v) for v in m[:, 1] if v < low or v > high)
        found.append((mid, {"min": low, "first_quartile": q1, "median": median,
                            "third_quartile": q3, "max": high, "outliers": sorted(outliers)}))
    return found


def _point_chart(ax):
    """Lines (Line2D) and scatters (PathCollection): a line chart, or a
    scatter chart when every series is markers only."""
    from matplotlib.collections import PathCollection
    series = []  # (label, xy, is_scatter)
    for line in ax.get_lines():
        xy = line.get_xydata()
        if not line.get_visible() or not len(xy):
            continue
        markers_only = line.get_linestyle() in ("None", "none", "", " ")
        series.append((_public_label(line), xy, markers_only))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and coll.get_visible() and len(coll.get_offsets()):
            series.append((_public_label(coll), coll.get_offsets(), True))
    if not series:
        return None
    points = sum(len(xy) for _, xy, _ in series)
    if points > MAX_CHART_POINTS:
        raise ValueError(f"{points} points: over the chart limit of {MAX_CHART_POINTS}")
    scatter = all(s for _, _, s in series)
    chart = _two_d(ax, "scatter" if scatter else "line")
    kinds = {}
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        kind = kinds[name] = _axis_kind(axis)
        locs, labels = _ticks(axis)
        chart[f"{name}_scale"] = kind
        chart[f"{name}_ticks"] = [_axis_value(axis, kind, v) if kind == "datetime" else _number(v) for v in locs]
        chart[f"{name}_tick_labels"] = labels
    chart["elements"] = [
        {"label": label, "points": [[_axis_value(ax.xaxis, kinds["x"], x), _axis_value(ax.yaxis, kinds["y"], y)]
                                    for x, y in xy]}
        for label, xy, _ in series]
    return chart


# Run silently in each new kernel: imports this file there as a module and
# installs the hooks above. It leaves no names in the user's namespace.
KERNEL_HOOKS_CODE = f"""
def __stasis_install_hooks():
    import importlib.util, sys
    try:
        spec = importlib.util.spec_from_file_location("stasis_interpreter_kernel", {os.path.abspath(__file__)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.install_kernel_hooks(get_ipython())
    except Exception as e:
        sys.__stderr__.write(f"stasis-interpreter kernel: hooks not installed: {{e!r}}\\n")
__stasis_install_hooks()
del __stasis_install_hooks
"""


class PythonContext:
    """An IPython kernel, started through jupyter_client."""

    language = "python"

    def __init__(self, cid: str, cwd: str):
        self.id = cid
        self.cwd = cwd
        self.lock = threading.Lock()
        self.km = None
        self.kc = None
        self._start()

    def _start(self) -> None:
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name="python3")
        env = dict(os.environ)
        env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        km.start_kernel(cwd=self.cwd, env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        except RuntimeError as e:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
            raise ApiError(500, f"python kernel did not start: {e}") from e
        self.km, self.kc = km, kc
        try:
            self._silent(KERNEL_HOOKS_CODE, timeout=KERNEL_START_TIMEOUT)
        except ApiError as e:
            # Charts and image hooks are extras: the context works without.
            print(f"stasis-interpreter: kernel hooks: {e.message}", file=sys.stderr, flush=True)

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def restart(self) -> None:
        self.shutdown()
        self._start()

    def shutdown(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001 - a dead kernel is the usual case
                pass
        self.km = self.kc = None

    def _silent(self, code: str, timeout: float = 30) -> None:
        """Runs bookkeeping code (env vars, hooks) without output or history."""
        msg_id = self.kc.execute(code, silent=True, store_history=False, stop_on_error=False)
        self._wait_reply(msg_id, None, timeout)

    def _wait_reply(self, msg_id: str, sink: Sink | None, timeout: float = 30) -> dict:
        """The shell reply to `msg_id` (its content)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.kc.get_shell_msg(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.alive():
                    raise ApiError(500, "the kernel died")
                if sink is None and time.monotonic() > deadline:
                    raise ApiError(500, "the kernel did not answer")
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply.get("content", {})

    def execute(self, code: str, env_vars: dict | None, sink: Sink) -> None:
        if not self.alive():
            sink.send({"type": "stderr", "text": "[stasis] the kernel had died; restarted it (its variables are gone)\n",
                       "timestamp": now_ns()})
            self.restart()
        if env_vars:
            self._silent(
                "import os as __stasis_os\n"
                f"__stasis_env_saved = {{k: __stasis_os.environ.get(k) for k in {list(env_vars)!r}}}\n"
                f"__stasis_os.environ.update({json.dumps(env_vars)})\n"
            )
        try:
            self._run(code, sink)
        finally:
            if env_vars and self.alive():
                self._silent(
                    "for __k, __v in __stasis_env_saved.items():\n"
                    "    if __v is None: __stasis_os.environ.pop(__k, None)\n"
                    "    else: __stasis_os.environ[__k] = __v\n"
                    "del __stasis_env_saved\n"
                )

    def _run(self, code: str, sink: Sink) -> None:
        # stop_on_error=False: with the default, ipykernel aborts requests
        # that reach it just after a failed one (an interrupted execution is
        # one), and the next call would silently return nothing.
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        interrupted = False
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self.alive():
                    sink.send({"type": "error", "name": "KernelDied",
                               "value": "the kernel died while running this code; it restarts on the next call",
                               "traceback": ""})
                    return
                if not interrupted and sink.gone():
                    # The client left (disconnect or read timeout): stop the
                    # code, keep the kernel and its variables.
                    self.km.interrupt_kernel()
                    interrupted = True
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            content = msg["content"]
            out = None
            if kind == "stream":
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                # A fast writer's output arrives as one large message: pass
                # it on in pieces, so the client sees it as a stream.
                pieces = split_text(content.get("text", ""))
                for piece in pieces[:-1]:
                    if not interrupted:
                        try:
                            sink.send({"type": name, "text": piece, "timestamp": now_ns()})
                        except ClientGone:
                            self.km.interrupt_kernel()
                            interrupted = True
                out = {"type": name, "text": pieces[-1], "timestamp": now_ns()}
            elif kind == "execute_result":
                out = result_message(content.get("data", {}), True)
            elif kind == "display_data":
                out = result_message(content.get("data", {}), False)
            elif kind == "error":
                out = {"type": "error", "name": content.get("ename", ""),
                       "value": content.get("evalue", ""),
                       "traceback": "\n".join(content.get("traceback", []))}
            elif kind == "execute_input":
                out = {"type": "number_of_executions",
                       "execution_count": content.get("execution_count")}
            elif kind == "status" and content.get("execution_state") == "idle":
                # Collect the shell reply (so the channel does not fill up);
                # an aborted request ran nothing and must not look like a
                # silent success.
                try:
                    reply = self._wait_reply(msg_id, None)
                except ApiError:
                    reply = {}
                if reply.get("status") == "aborted" and not interrupted:
                    sink.send({"type": "error", "name": "ExecutionAborted",
                               "value": "the kernel aborted this execution", "traceback": ""})
                return
            if out is not None and not interrupted:
                try:
                    sink.send(out)
                except ClientGone:
                    self.km.interrupt_kernel()
                    interrupted = True


class BashContext:
    """One long-lived bash; each execution is sourced into it."""

    language = "bash"

    def __init__(self, cid: str, cwd: str):
        self.id = cid
        self.cwd = cwd
        self.lock = threading.Lock()
        self.count = 0
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix=f"stasis-bash-{cid}-")
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=self.cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, bufsize=0,
        )
        # An interrupt stops the running command, not the shell.
        self.proc.stdin.write(b"trap 'echo interrupted >&2' INT\n")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.shutdown()
        self._start()

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def execute(self, code: str, env_vars: dict | None, sink: Sink) -> None:
        if not self.alive():
            self.restart()
        self.count += 1
        sink.send({"type": "number_of_executions", "execution_count": self.count})
        marker = uuid.uuid4().hex
        cell = os.path.join(self.dir, "cell.sh")
        with open(cell, "w") as f:
            f.write(code)
            f.write("\n")
        exports = "".join(
            f"{k}={shell_quote(v)} " for k, v in (env_vars or {}).items() if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)
        )
        # env vars apply to this execution only: a subshell would lose `cd`
        # and variables, so they are exported around the source instead.
        saved = ""
        restore = ""
        if exports:
            names = [k for k in (env_vars or {}) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
            saved = "".join(f"__stasis_{k}=${{{k}-__stasis_unset}}; " for k in names)
            restore = "".join(
                f"if [ \"$__stasis_{k}\" = __stasis_unset ]; then unset {k}; else export {k}=\"$__stasis_{k}\"; fi; "
                for k in names
            )
            exports = "export " + exports + "; "
        line = (f"{saved}{exports}source {shell_quote(cell)}; __stasis_rc=$?; {restore}"
                f"printf '\\n{marker} %d\\n' $__stasis_rc; printf '\\n{marker}\\n' >&2\n")
        self.proc.stdin.write(line.encode())
        self._pump(marker, sink)

    def _pump(self, marker: str, sink: Sink) -> None:
        streams = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        buffers = {"stdout": b"", "stderr": b""}
        done = {"stdout": False, "stderr": False}
        held = {"stdout": False, "stderr": False}
        rc = None
        interrupted = False
        end = marker.encode()
        while not all(done.values()):
            readable, _, _ = select.select(list(streams), [], [], POLL_SECONDS)
            if not readable:
                if not self.alive():
                    sink.send({"type": "error", "name": "ShellDied",
                               "value": "bash exited; it restarts on the next call", "traceback": ""})
                    return
                if not interrupted and sink.gone():
                    self._interrupt()
                    interrupted = True
                continue
            for fd in readable:
                name = streams[fd]
                chunk = os.read(fd, 65536)
                if not chunk:
                    done[name] = True
                    continue
                buf = buffers[name] + chunk
                # Emit whole lines; keep a partial line (and a possible
                # partial marker) for the next read.
                while b"\n" in buf:
                    text, buf = buf.split(b"\n", 1)
                    if text.startswith(end):
                        # The marker follows a newline of its own: a blank
                        # line held back just before it was ours, not output.
                        done[name] = True
                        held[name] = False
                        rest = text[len(end):].strip()
                        if rest.isdigit():
                            rc = int(rest)
                        continue
                    if done[name] or interrupted:
                        continue
                    lines = []
                    if held[name]:
                        lines.append("\n")
                        held[name] = False
                    if text:
                        lines.append(text.decode(errors="replace") + "\n")
                    else:
                        held[name] = True
                    try:
                        for t in lines:
                            sink.send({"type": name, "text": t, "timestamp": now_ns()})
                    except ClientGone:
                        self._interrupt()
                        interrupted = True
                buffers[name] = buf
        if rc:
            sink.send({"type": "error", "name": "ExitCodeError", "value": f"exit status {rc}",
                       "traceback": ""})

    def _interrupt(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def shell_quote(s: str) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


class Contexts:
    """All contexts of this sandbox, and the default one of each language."""

    def __init__(self, default_cwd: str):
        self.default_cwd = default_cwd
        self.lock = threading.Lock()
        self.by_id: dict = {}
        self.defaults: dict = {}

    @staticmethod
    def language(name: str | None) -> str:
        lang = LANGUAGE_ALIASES.get((name or "python").lower())
        if lang is None:
            raise ApiError(400, f"language {name!r} is not supported (supported: python, bash)")
        return lang

    def create(self, language: str | None, cwd: str | None):
        lang = self.language(language)
        cwd = cwd or self.default_cwd
        if not os.path.isdir(cwd):
            raise ApiError(400, f"cwd {cwd!r} is not a directory")
        cid = uuid.uuid4().hex
        ctx = (PythonContext if lang == "python" else BashContext)(cid, cwd)
        with self.lock:
            self.by_id[cid] = ctx
        return ctx

    def default(self, language: str | None):
        lang = self.language(language)
        with self.lock:
            cid = self.defaults.get(lang)
            if cid in self.by_id:
                return self.by_id[cid]
        ctx = self.create(lang, None)
        with self.lock:
            # Two first calls may race: keep the first default, drop ours.
            if self.defaults.get(lang) in self.by_id:
                winner = self.by_id[self.defaults[lang]]
                del self.by_id[ctx.id]
                threading.Thread(target=ctx.shutdown, daemon=True).start()
                return winner
            self.defaults[lang] = ctx.id
        return ctx

    def get(self, cid: str):
        with self.lock:
            ctx = self.by_id.get(cid)
        if ctx is None:
            raise ApiError(404, f"context {cid!r} not found")
        return ctx

    def remove(self, cid: str) -> None:
        with self.lock:
            ctx = self.by_id.pop(cid, None)
            for lang, d in list(self.defaults.items()):
                if d == cid:
                    del self.defaults[lang]
        if ctx is None:
            raise ApiError(404, f"context {cid!r} not found")
        ctx.shutdown()

    def list(self) -> list:
        with self.lock:
            return [describe(c) for c in self.by_id.values()]

    def shutdown(self) -> None:
        with self.lock:
            ctxs = list(self.by_id.values())
            self.by_id.clear()
        for c in ctxs:
            c.shutdown()


def describe(ctx) -> dict:
    return {"id": ctx.id, "language": ctx.language, "cwd": ctx.cwd}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stasis-interpreter/1"
    contexts: Contexts  # set on the class by serve()

    def log_message(self, fmt, *args):  # noqa: D102 - quieter than the default
        if os.environ.get("STASIS_INTERPRETER_DEBUG"):
            super().log_message(fmt, *args)

    # --- plumbing ---------------------------------------------------------
    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        return data

    def _send(self, status: int, body=None) -> None:
        payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _dispatch(self, method: str) -> None:
        try:
            self._route(method)
        except ApiError as e:
            self._send(e.status, {"code": e.status, "message": e.message})
        except ClientGone:
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - answer, never drop the server
            self._send(500, {"code": 500, "message": f"{type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    # --- routes -----------------------------------------------------------
    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/health":
            return self._send(200, b"OK")
        if method == "POST" and path == "/execute":
            return self._execute(self._body())
        if path == "/contexts":
            if method == "POST":
                body = self._body()
                ctx = self.contexts.create(body.get("language"), body.get("cwd"))
                return self._send(200, describe(ctx))
            if method == "GET":
                return self._send(200, self.contexts.list())
        if len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            self.contexts.remove(parts[1])
            return self._send(204)
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" and method == "POST":
            ctx = self.contexts.get(parts[1])
            with ctx.lock:
                ctx.restart()
            return self._send(204)
        raise ApiError(404, f"no route {method} {path}")

    def _execute(self, body: dict) -> None:
        code = body.get("code")
        if not isinstance(code, str):
            raise ApiError(400, "`code` (a string) is required")
        env_vars = body.get("env_vars") or None
        if env_vars is not None and (not isinstance(env_vars, dict)
                                     or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env_vars.items())):
            raise ApiError(400, "`env_vars` must map strings to strings")
        if body.get("context_id") and body.get("language"):
            raise ApiError(400, "give `context_id` or `language`, not both")
        if body.get("context_id"):
            ctx = self.contexts.get(body["context_id"])
        else:
            ctx = self.contexts.default(body.get("language"))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sink = Sink(self)
        with ctx.lock:
            try:
                ctx.execute(code, env_vars, sink)
                sink.send({"type": "end_of_execution"})
            except ClientGone:
                self.close_connection = True
                return
            except ApiError as e:
                try:
                    sink.send({"type": "error", "name": "InterpreterError", "value": e.message,
                               "traceback": ""})
                except ClientGone:
                    self.close_connection = True
                    return
        sink.close()


def serve(host: str, port: int, cwd: str, ready=None) -> None:
    contexts = Contexts(cwd)
    Handler.contexts = contexts
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    print(f"stasis-interpreter: listening on {host}:{server.server_address[1]}", flush=True)
    if ready:
        ready(server.server_address[1])
    try:
        # The default python context starts with the server, so the first
        # run_code does not wait for a kernel.
        if os.environ.get("STASIS_INTERPRETER_PREWARM", "1") == "1":
            threading.Thread(target=lambda: contexts.default("python"), daemon=True).start()
        server.serve_forever(poll_interval=0.5)
    finally:
        contexts.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default=os.environ.get("STASIS_INTERPRETER_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("STASIS_INTERPRETER_PORT", DEFAULT_PORT)))
    home = os.environ.get("HOME") or "/home/user"
    p.add_argument("--cwd", default="/home/user" if os.path.isdir("/home/user") else home)
    a = p.parse_args()
    serve(a.host, a.port, a.cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
