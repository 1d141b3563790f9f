// The JS SDK (npm novita-sandbox 2.1.1) against stasis: signed download /
// upload URLs (valid, expired, tampered) fetched with plain fetch(), and
// getMetrics() after some CPU load. Run by test_js.py with
// NOVITA_JS_SDK = the installed package's directory.
const { Sandbox } = require(process.env.NOVITA_JS_SDK);

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function main() {
  const sbx = await Sandbox.create('agent', { timeoutMs: 300_000 });
  try {
    await sbx.files.write('js/hello.txt', 'hello from js');
    const url = await sbx.downloadUrl('js/hello.txt');
    check(url.includes('signature=v1_'), `signed url ${url}`);
    let r = await fetch(url);
    check(r.status === 200, `download status ${r.status}`);
    check((await r.text()) === 'hello from js', 'download body');

    const up = await sbx.uploadUrl('js/up.txt');
    const form = new FormData();
    form.append('file', new Blob(['uploaded by js']), 'up.txt');
    r = await fetch(up, { method: 'POST', body: form });
    check(r.status === 200, `upload status ${r.status} ${await r.text()}`);
    check((await sbx.files.read('js/up.txt')) === 'uploaded by js', 'uploaded content');

    const expired = await sbx.downloadUrl('js/hello.txt', { useSignatureExpiration: -5 });
    r = await fetch(expired);
    let body = await r.json();
    check(r.status === 401 && body.message === 'signature is already expired', `expired: ${r.status} ${JSON.stringify(body)}`);

    const u = new URL(url);
    const sig = u.searchParams.get('signature');
    u.searchParams.set('signature', sig.slice(0, -2) + (sig.endsWith('AA') ? 'BB' : 'AA'));
    r = await fetch(u);
    body = await r.json();
    check(r.status === 401 && body.message === 'invalid signature', `tampered: ${r.status} ${JSON.stringify(body)}`);

    const h = await sbx.commands.run("timeout 30 sh -c 'while :; do :; done'", { background: true });
    const deadline = Date.now() + 30_000;
    let busy = [];
    while (busy.length < 2) {
      check(Date.now() < deadline, 'metrics showing CPU load in time');
      await new Promise((res) => setTimeout(res, 100));
      const ms = await sbx.getMetrics();
      busy = ms.filter((m) => m.cpuUsedPct > 20);
    }
    await h.kill();
    const m = busy[busy.length - 1];
    check(m.cpuCount >= 1 && m.memTotal === 64 * 1024 * 1024 && m.memUsed > 0, `metric ${JSON.stringify(m)}`);
    check(m.timestamp instanceof Date || typeof m.timestamp === 'string', 'metric timestamp');
    console.log(`JS OK: ${busy.length} busy samples, last cpuUsedPct=${m.cpuUsedPct}`);
  } finally {
    await sbx.kill();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
