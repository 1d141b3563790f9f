"""Offline validation of the deployment files in deploy/.

- deploy/nomad/*.nomad.hcl: parsed with python-hcl2 (HCL2 syntax), then
  checked for what a stasis pool needs: a `system` job, a KVM constraint,
  the raw_exec or exec driver, a service with an HTTP health check on
  /health, SIGTERM with a kill_timeout longer than --shutdown-pause-secs,
  secrets from a template rendered into the environment.
- deploy/kubernetes/*.yaml: every document validated against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
  are errors), then checked: a DaemonSet with a KVM node selector, a
  privileged container (or a KVM device resource), hostPath data and cache
  volumes, readiness and liveness probes on /health, a grace period longer
  than --shutdown-pause-secs, settings from Secrets/ConfigMaps, a Service
  selecting the pods on the port discovery reads, and RBAC for
  EndpointSlices.

Prints one JSON object (the flags each file passes to `stasis serve`, the
timeouts) for tests/deploy.rs, which checks the flags against
`stasis serve --help`. Exits 1 with every problem listed on failure.
"""

import glob
import json
import os
import re
import sys

import hcl2
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("STASIS_K8S_VERSION", "1.33.0")
problems = []


def problem(f, msg):
    problems.append(f"{f}: {msg}")


def unq(v):
    """python-hcl2 keeps string literals' quotes; drop them."""
    if isinstance(v, str) and len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1]
    return v


def blocks(d, name):
    return d.get(name, []) if isinstance(d, dict) else []


def labelled(d, name):
    """[(label, body)] of labelled blocks `name "label" { ... }`."""
    out = []
    for b in blocks(d, name):
        for k, v in b.items():
            if k != "__is_block__":
                out.append((unq(k), v))
    return out


def duration_s(v):
    m = re.fullmatch(r"(\d+)(s|m|h)", unq(v) or "")
    if not m:
        return None
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def flags_of(args):
    """Flags (--x) and each flag's value (the next token if not a flag)."""
    flags, values = [], {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            flags.append(name)
            if "=" in a:
                values[name] = a.split("=", 1)[1]
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                values[name] = args[i + 1]
    return flags, values


def rel(path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a = os.path.abspath(path)
    return os.path.relpath(a, repo) if a.startswith(repo + os.sep) else a


def check_nomad(path):
    f = rel(path)
    try:
        with open(path) as fh:
            d = hcl2.load(fh)
    except Exception as e:  # noqa: BLE001 - any parse error is a finding
        problem(f, f"not valid HCL2: {e}")
        return None
    jobs = labelled(d, "job")
    if len(jobs) != 1:
        problem(f, f"expected one job, found {len(jobs)}")
        return None
    name, job = jobs[0]
    if unq(job.get("type")) != "system":
        problem(f, f"job {name}: type must be \"system\" (one host per node), is {job.get('type')}")
    cons = [unq(c.get("attribute")) for c in blocks(job, "constraint")]
    if not any("kvm" in (c or "") for c in cons):
        problem(f, "no KVM constraint (a constraint on a kvm attribute or meta)")
    groups = labelled(job, "group")
    if len(groups) != 1:
        problem(f, f"expected one group, found {len(groups)}")
        return None
    gname, group = groups[0]
    ports = [p for n in blocks(group, "network") for p, _ in labelled(n, "port")]
    services = blocks(group, "service")
    tasks = labelled(group, "task")
    for t in tasks:
        services += blocks(t[1], "service")
    if not services:
        problem(f, "no service (discovery reads the Nomad service)")
    health = None
    for s in services:
        if unq(s.get("port")) not in ports:
            problem(f, f"service port {s.get('port')} is not a port of the group's network {ports}")
        for c in blocks(s, "check"):
            if unq(c.get("type")) == "http":
                health = unq(c.get("path"))
    if health is None:
        problem(f, "no HTTP health check on the service")
    if len(tasks) != 1:
        problem(f, f"expected one task, found {len(tasks)}")
        return None
    tname, task = tasks[0]
    driver = unq(task.get("driver"))
    if driver not in ("raw_exec", "exec"):
        problem(f, f"task {tname}: driver must be raw_exec or exec, is {driver}")
    if unq(task.get("kill_signal", '"SIGINT"')) != "SIGTERM":
        problem(f, "kill_signal must be SIGTERM (starts the drain)")
    kill = duration_s(task.get("kill_timeout", ""))
    if kill is None:
        problem(f, f"kill_timeout {task.get('kill_timeout')} is not a duration like \"300s\"")
    cfg = (blocks(task, "config") or [{}])[0]
    args = [unq(a) for a in cfg.get("args", [])]
    if not args or args[0] != "serve":
        problem(f, f"the command's first argument must be serve, is {args[:1]}")
    flags, values = flags_of(args)
    if not any(t.get("env") is True for t in blocks(task, "template")):
        problem(f, "secrets: no template rendered into the environment (env = true)")
    return {
        "file": f,
        "flags": flags,
        "values": values,
        "kill_timeout_s": kill,
        "health_path": health,
        "driver": driver,
    }


def check_kubernetes(path):
    f = rel(path)
    try:
        with open(path) as fh:
            docs = [x for x in yaml.safe_load_all(fh) if x is not None]
    except yaml.YAMLError as e:
        problem(f, f"not valid YAML: {e}")
        return None
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problem(f, f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {where}: {e.message}")
        except Exception as e:  # noqa: BLE001 - unknown kind, bad version
            problem(f, f"{doc.get('kind')}: {e}")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append(doc)
    ds = by_kind.get("DaemonSet", [])
    if len(ds) != 1:
        problem(f, f"expected one DaemonSet, found {len(ds)}")
        return None
    ds = ds[0]
    pod = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"].get("labels", {})
    if not any("kvm" in k for k in pod.get("nodeSelector", {})):
        problem(f, "DaemonSet: no KVM node selector")
    grace = pod.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int):
        problem(f, "DaemonSet: terminationGracePeriodSeconds missing (the drain needs it)")
    cs = pod.get("containers", [])
    if len(cs) != 1:
        problem(f, f"DaemonSet: expected one container, found {len(cs)}")
        return None
    c = cs[0]
    privileged = c.get("securityContext", {}).get("privileged") is True
    kvm_resource = any("kvm" in k for k in c.get("resources", {}).get("limits", {}))
    if not (privileged or kvm_resource):
        problem(f, "container: neither privileged nor a KVM device resource")
    probes = {}
    for p in ("readinessProbe", "livenessProbe"):
        path_ = c.get(p, {}).get("httpGet", {}).get("path")
        if path_ is None:
            problem(f, f"container: no HTTP {p}")
        probes[p] = path_
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    for want in ("data", "cache"):
        if want not in host_paths or want not in mounts:
            problem(f, f"container: no hostPath volume {want!r} mounted")
    args = [str(a) for a in c.get("args", [])]
    if not args or args[0] != "serve":
        problem(f, f"container: the first argument must be serve, is {args[:1]}")
    flags, values = flags_of(args)
    env_names = {e["name"] for e in c.get("env", [])}
    for ref in re.findall(r"\$\(([A-Z0-9_]+)\)", " ".join(args)):
        if ref not in env_names:
            problem(f, f"container: args use $({ref}) but no env var {ref} is defined")
    secret_env = [e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    if not secret_env:
        problem(f, "container: no setting from a Secret (database URL, S3 keys)")
    port_names = {p.get("name") for p in c.get("ports", [])}
    svcs = by_kind.get("Service", [])
    if not svcs:
        problem(f, "no Service (discovery reads its EndpointSlices)")
    for s in svcs:
        sel = s["spec"].get("selector", {})
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            problem(f, f"Service {s['metadata']['name']}: selector {sel} does not select the DaemonSet's pods {labels}")
        svc_ports = {p.get("name") for p in s["spec"].get("ports", [])}
        want = values.get("--k8s-port-name", "http")
        if want not in svc_ports:
            problem(f, f"Service {s['metadata']['name']}: no port named {want!r} (--k8s-port-name)")
        for p in s["spec"].get("ports", []):
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in port_names:
                problem(f, f"Service: targetPort {p['targetPort']!r} is no container port name {port_names}")
        if values.get("--k8s-service", "stasis") != s["metadata"]["name"]:
            problem(f, f"--k8s-service {values.get('--k8s-service')} is not the Service {s['metadata']['name']}")
    rules = [r for role in by_kind.get("Role", []) + by_kind.get("ClusterRole", []) for r in role.get("rules", [])]
    if not any("endpointslices" in r.get("resources", []) and "list" in r.get("verbs", []) for r in rules):
        problem(f, "RBAC: no rule to list endpointslices")
    sa = pod.get("serviceAccountName")
    bound = [s.get("name") for rb in by_kind.get("RoleBinding", []) for s in rb.get("subjects", [])]
    if sa not in bound:
        problem(f, f"RBAC: the pods' service account {sa} is not bound to the role")
    return {
        "file": f,
        "flags": flags,
        "values": values,
        "grace_period_s": grace,
        "health_paths": sorted(set(probes.values()) - {None}),
        "kubernetes_version": K8S_VERSION,
        "documents": len(docs),
    }


def main():
    root = os.path.dirname(os.path.abspath(__file__))
    out = {"nomad": [], "kubernetes": []}
    nomad = sorted(glob.glob(os.path.join(root, "nomad", "*.nomad.hcl")))
    k8s = sorted(glob.glob(os.path.join(root, "kubernetes", "*.yaml")))
    if not nomad:
        problem("deploy/nomad", "no *.nomad.hcl file")
    if not k8s:
        problem("deploy/kubernetes", "no *.yaml file")
    # Extra files to check (tests/deploy.rs passes broken copies); with
    # --only, just those.
    extra = [a for a in sys.argv[1:] if a != "--only"]
    if "--only" in sys.argv[1:]:
        nomad, k8s, problems[:] = [], [], []
    for p in nomad + [x for x in extra if x.endswith(".hcl")]:
        r = check_nomad(p)
        if r:
            out["nomad"].append(r)
    for p in k8s + [x for x in extra if x.endswith((".yaml", ".yml"))]:
        r = check_kubernetes(p)
        if r:
            out["kubernetes"].append(r)
    if problems:
        for p in problems:
            print(f"validate: {p}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
