// The seed's persistence flow with runCode, through the real JS SDK
// (novita-sandbox/code-interpreter) against `stasis serve`.
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
  console.log(`JS-FLOW-OK x=${b.text}`);
} finally {
  await sbx.kill();
}
