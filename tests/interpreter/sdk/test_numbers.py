"""Numbers of the code-interpreter path on the fake backend (printed, never
asserted: speed belongs in benchmarks): create -> first run_code result,
run_code('1+1') round trips, and a sandbox holding a 200 MB DataFrame:
pause, and resume -> next run_code result. Run it alone with
`tests/interpreter/run.sh sdk/test_numbers.py -s`."""

import statistics
import time

from novita_sandbox.code_interpreter import Sandbox


def test_print_code_interpreter_numbers(stasis, capsys):
    t0 = time.monotonic()
    sbx = Sandbox.create(timeout=120)
    t_created = time.monotonic()
    first = sbx.run_code("1 + 1")
    t_first = time.monotonic()
    assert first.text == "2"
    try:
        rtt = []
        for _ in range(20):
            a = time.monotonic()
            assert sbx.run_code("1+1").text == "2"
            rtt.append(time.monotonic() - a)
        ex = sbx.run_code("import numpy as np, pandas as pd\n"
                          "df = pd.DataFrame(np.random.default_rng(1).random((25_000_000 // 8, 8)))\n"
                          "int(df.memory_usage().sum() // 2**20)")
        assert ex.error is None, ex.error
        a = time.monotonic()
        sbx.beta_pause()
        t_pause = time.monotonic() - a
        a = time.monotonic()
        again = Sandbox.connect(sbx.sandbox_id)
        shape = again.run_code("df.shape[0]").text
        t_resume = time.monotonic() - a
        assert shape == str(25_000_000 // 8)
        with capsys.disabled():
            print(
            f"\n[numbers] fake backend: create {1e3 * (t_created - t0):.0f} ms, "
            f"create -> first run_code result {1e3 * (t_first - t0):.0f} ms; "
            f"run_code('1+1') median {1e3 * statistics.median(rtt):.1f} ms "
            f"(min {1e3 * min(rtt):.1f}, max {1e3 * max(rtt):.1f}, n=20); "
            f"{ex.text} MiB DataFrame: pause {1e3 * t_pause:.0f} ms, "
            f"connect -> next run_code result {1e3 * t_resume:.0f} ms"
            )
    finally:
        sbx.kill()
