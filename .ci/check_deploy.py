#!/usr/bin/env python3
"""Structural checks of the deploy files that no schema covers, for .ci/check-deploy.sh.

Every YAML, JSON and TOML file under deploy/ and dashboards/ must parse. Beyond that, what a
schema cannot see: compose's secrets, bind mounts and build files exist (the secrets in a folder
that deploy/compose-secrets.sh filled); the Kubernetes manifests read only Secrets whose shape
secrets.example.yaml shows, and the agents request GPUs on nodes picked by GPU product; the
Dockerfiles copy only files that exist; the cloud-init user data embeds deploy/install-agent.sh
unchanged; the SkyPilot and dstack tasks ask for a GPU and run the installer.

Usage: check_deploy.py REPO SECRETS_DIR   (prints one line per check; exits 1 on any failure)
"""

import json
import pathlib
import re
import sys
import tomllib

import yaml

REPO = pathlib.Path(sys.argv[1]).resolve()
SECRETS = pathlib.Path(sys.argv[2]).resolve()
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def parse_all():
    docs = {}
    for base in ("deploy", "dashboards"):
        for p in sorted((REPO / base).rglob("*")):
            if "secrets" in p.relative_to(REPO).parts or not p.is_file():
                continue
            rel = str(p.relative_to(REPO))
            try:
                if p.suffix in (".yaml", ".yml"):
                    docs[rel] = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
                elif p.suffix == ".json":
                    docs[rel] = [json.loads(p.read_text())]
                elif p.suffix == ".toml":
                    docs[rel] = [tomllib.loads(p.read_text())]
                else:
                    continue
                check(True, f"parses: {rel}")
            except Exception as e:  # noqa: BLE001 - any parse error is the finding
                check(False, f"parses: {rel}: {e}")
    return docs


def check_compose(doc):
    compose_dir = REPO / "deploy"
    services = doc["services"]
    defined = doc.get("secrets", {})
    for name, svc in services.items():
        for s in svc.get("secrets", []):
            s = s if isinstance(s, str) else s["source"]
            check(s in defined, f"compose: {name} uses a defined secret {s}")
        for v in svc.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")):
                check((compose_dir / src).exists(), f"compose: {name} mounts an existing {src}")
            else:
                check(src in doc.get("volumes", {}), f"compose: {name} uses a declared volume {src}")
        build = svc.get("build")
        if build:
            ctx = compose_dir / build["context"]
            check((ctx / build["dockerfile"]).is_file(), f"compose: {name} builds from an existing {build['dockerfile']}")
        for dep in svc.get("depends_on", []):
            check(dep in services, f"compose: {name} depends on a service {dep}")
    for name, s in defined.items():
        rel = pathlib.Path(s["file"])
        check(rel.parts[0] == "secrets", f"compose: secret {name} lives in deploy/secrets/")
        made = SECRETS / pathlib.Path(*rel.parts[1:])
        check(made.exists(), f"compose: deploy/compose-secrets.sh makes secret {name} ({rel})")
    cmd = " ".join(services["coordinator"].get("command", []))
    check("--tls-cert" in cmd and "--tls-key" in cmd, "compose: the coordinator serves TLS")


def k8s_objects(docs):
    objs = []
    for rel, ds in docs.items():
        if rel.startswith("deploy/k8s/") and not rel.endswith("kustomization.yaml"):
            objs += [(rel, d) for d in ds]
    return objs


def check_k8s(docs):
    kust = docs["deploy/k8s/kustomization.yaml"][0]
    for r in kust["resources"]:
        check((REPO / "deploy/k8s" / r).is_file(), f"k8s: kustomization resource {r} exists")
    check("secrets.example.yaml" not in kust["resources"], "k8s: placeholder Secrets are not applied")
    objs = k8s_objects(docs)
    example = {d["metadata"]["name"]: d for rel, d in objs if d["kind"] == "Secret"}
    for rel, d in objs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        check(pod["securityContext"].get("runAsNonRoot") is True, f"k8s: {name} runs as non-root")
        for v in pod.get("volumes", []):
            if "secret" in v:
                sec = v["secret"]["secretName"]
                check(sec in example, f"k8s: {name} reads Secret {sec}, shown in secrets.example.yaml")
                for item in v["secret"].get("items", []):
                    check(item["key"] in example.get(sec, {}).get("stringData", {}),
                          f"k8s: {name} reads key {item['key']} of {sec}")
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check(ref["key"] in example.get(ref["name"], {}).get("stringData", {}),
                          f"k8s: {name} reads key {ref['key']} of Secret {ref['name']}")
            args = " ".join(c.get("args", []))
            if d["kind"] == "Deployment":
                check("--tls-cert" in args and "--tls-key" in args, f"k8s: {name} serves TLS")
        if d["kind"] == "DaemonSet":
            c = pod["containers"][0]
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            check(isinstance(gpus, int) and gpus >= 1, f"k8s: {name} requests nvidia.com/gpu")
            check("nvidia.com/gpu.product" in pod.get("nodeSelector", {}),
                  f"k8s: {name} selects nodes by nvidia.com/gpu.product")
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            check(env.get("FLEETMARK_COORDINATOR", "").startswith("https://"), f"k8s: {name} dials the coordinator over TLS")
            check("--ca-cert" in " ".join(c.get("args", [])), f"k8s: {name} checks the coordinator's certificate")
            check("FLEETMARK_TOKEN_FILE" in env and "FLEETMARK_TOKEN" not in env, f"k8s: {name} reads its token from a Secret file")


def check_dockerfiles():
    for p in sorted((REPO / "deploy/docker").glob("*.Dockerfile")):
        rel = p.relative_to(REPO)
        text = p.read_text()
        for line in text.splitlines():
            m = re.match(r"^COPY\s+(?!--from)(.*)$", line.strip())
            if not m:
                continue
            parts = [x for x in m.group(1).split() if not x.startswith("--")]
            for src in parts[:-1]:
                # prebuilt/ is filled only for a BINARIES=prebuilt build (.ci/podman-smoke.sh).
                if src != "." and not src.startswith("prebuilt/"):
                    check((REPO / src).exists(), f"{rel}: COPY source {src} exists")
        check(re.search(r"^USER\s+\d+", text, re.M) is not None, f"{rel}: runs as a numeric non-root user")
        check("ENTRYPOINT [" in text, f"{rel}: exec-form entrypoint")
    agent = (REPO / "deploy/docker/agent.Dockerfile").read_text()
    check(re.search(r"nvidia/cuda:[0-9.]+-cudnn-runtime", agent) is not None, "agent image: NVIDIA CUDA runtime base with cuDNN")
    check('CAPS="75 80 86 89 90"' in agent, "agent image: builds T4, A100, A10, L4/L40S and H100/H200 by default")


def check_cloud_init(docs):
    ci = docs["deploy/cloud-init/agent.yaml"][0]
    files = {f["path"]: f for f in ci["write_files"]}
    embedded = files["/usr/local/sbin/fleetmark-install-agent"]["content"]
    check(embedded == (REPO / "deploy/install-agent.sh").read_text(),
          "cloud-init: the embedded installer is deploy/install-agent.sh, unchanged")
    check(files["/etc/fleetmark/agent.token"]["permissions"] == "0600", "cloud-init: the token file is private")
    run = [" ".join(c) if isinstance(c, list) else c for c in ci["runcmd"]]
    check(any("--systemd" in c for c in run), "cloud-init: installs the service")


def check_launchers(docs):
    sky = docs["deploy/skypilot/agent.yaml"][0]
    check(re.match(r"^[A-Za-z0-9]+:\d+$", str(sky["resources"]["accelerators"])) is not None, "skypilot: asks for a GPU kind")
    check("use_spot" in sky["resources"], "skypilot: spot or on-demand is chosen")
    check("install-agent.sh" in sky["setup"], "skypilot: runs the installer")
    check("FLEETMARK_TOKEN" in sky.get("secrets", {}) and "FLEETMARK_TOKEN" not in sky.get("envs", {}),
          "skypilot: the token is a secret")
    ds = docs["deploy/dstack/agent.dstack.yml"][0]
    check(ds["type"] == "task" and "gpu" in ds["resources"], "dstack: a task asking for a GPU")
    check(ds.get("spot_policy") in ("spot", "on-demand", "auto"), "dstack: spot policy set")
    check(any("install-agent.sh" in c for c in ds["commands"]), "dstack: runs the installer")
    check(any("secrets." in e for e in ds["env"] if e.startswith("FLEETMARK_TOKEN=")), "dstack: the token is a secret")


def main():
    docs = parse_all()
    check_compose(docs["deploy/compose.yaml"][0])
    check_k8s(docs)
    check_dockerfiles()
    check_cloud_init(docs)
    check_launchers(docs)
    dash = docs["dashboards/fleetmark.json"][0]
    check(any(i.get("type") == "datasource" for i in dash.get("__inputs", [])), "dashboard: __inputs has a data source")
    for kind in ("datasources", "dashboards"):
        p = f"dashboards/provisioning/{kind}/fleetmark.yaml"
        check(p in docs, f"grafana: {p} exists")
    check("datasources" in docs["dashboards/provisioning/datasources/fleetmark.yaml"][0]
          and "providers" not in docs["dashboards/provisioning/datasources/fleetmark.yaml"][0],
          "grafana: the data source file holds only data sources")
    check("providers" in docs["dashboards/provisioning/dashboards/fleetmark.yaml"][0]
          and "datasources" not in docs["dashboards/provisioning/dashboards/fleetmark.yaml"][0],
          "grafana: the dashboards file holds only providers")
    n = len(failures)
    print(f"deploy structure: {'all checks passed' if not n else f'{n} failed'}")
    sys.exit(1 if n else 0)


if __name__ == "__main__":
    main()
