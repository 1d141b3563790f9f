// DNS stand-in for the JS SDK test: names under sandbox.test resolve to the
// TLS listener's loopback address (STASIS_TLS_IP), as a wildcard record would.
const dns = require("dns");
const ip = process.env.STASIS_TLS_IP;
const real = dns.lookup;
dns.lookup = function (host, opts, cb) {
  if (typeof opts === "function") { cb = opts; opts = {}; }
  if (typeof host === "string" && (host === "sandbox.test" || host.endsWith(".sandbox.test"))) {
    if (opts && opts.all) return process.nextTick(cb, null, [{ address: ip, family: 4 }]);
    return process.nextTick(cb, null, ip, 4);
  }
  return real.call(dns, host, opts, cb);
};
