// The seed's persistence flow with runCode, through the real JS SDK
// (novita-sandbox/code-interpreter) against `stasis serve`, and a chart.
import { Sandbox } from "novita-sandbox/code-interpreter";

const sbx = await Sandbox.create({ timeoutMs: 120_000 });
try {
  const a = await sbx.runCode("x = 1");
  if (a.error) throw new Error(`x = 1 failed: ${JSON.stringify(a.error)}`);
  await sbx.betaPause();
  const again = await Sandbox.connect(sbx.sandboxId);
  const b = await again.runCode("x");
  if (b.text !== "1") throw new Error(`after resume x is ${b.text}`);
  const c = await again.runCode("echo $((40+2))", { language: "bash" });
  if (c.logs.stdout.join("") !== "42\n") throw new Error(`bash: ${JSON.stringify(c.logs)}`);
  // A matplotlib figure: its png and the chart metadata, as the JS SDK
  // parses them (Result.chart, Result.formats()).
  const d = await again.runCode(
    "import matplotlib.pyplot as plt\n" +
    "plt.bar(['a', 'b'], [3, 5], label='n')\n" +
    "plt.title('T'); plt.ylabel('count (items)')\n" +
    "plt.show()");
  const r = d.results[0];
  if (d.error || !r || !r.png) throw new Error(`figure: ${JSON.stringify(d.error)} ${r && r.formats()}`);
  const chart = r.chart;
  const bars = (chart && chart.elements || []).map((e) => `${e.label}/${e.group}=${e.value}`).join(",");
  if (!chart || chart.type !== "bar" || chart.title !== "T" || chart.y_unit !== "items" ||
      bars !== "a/n=3,b/n=5" || Object.keys(r.extra).length) {
    throw new Error(`chart: ${JSON.stringify(chart)} formats ${r.formats()} extra ${Object.keys(r.extra)}`);
  }
  console.log(`JS-FLOW-OK x=${b.text} chart=${chart.type}:${bars}`);
} finally {
  await sbx.kill();
}
