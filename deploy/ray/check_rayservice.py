"""Check deploy/ray/rayservice.yaml against KubeRay's RayService CRD, strictly.

    python deploy/ray/check_rayservice.py PATH/TO/ray.io_rayservices.yaml [MANIFEST]

The CRD comes with KubeRay (ray-operator/config/crd/bases/ray.io_rayservices.yaml, or the
helm chart's crds/). Its openAPIV3Schema for the manifest's apiVersion is turned into a JSON
Schema that also refuses unknown fields (Kubernetes would silently drop them), and the
manifest is validated with jsonschema. Its serveConfigV2 is then validated with Ray Serve's
own ServeDeploySchema, and each application's args with SIE's app builder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

MANIFEST = Path(__file__).with_name("rayservice.yaml")


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as a JSON Schema: unknown fields refused, int-or-string allowed."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schema_for(crd: dict, api_version: str) -> dict:
    group, _, version = api_version.partition("/")
    if group != crd["spec"]["group"]:
        raise SystemExit(f"apiVersion {api_version} is not of group {crd['spec']['group']}")
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict(v["schema"]["openAPIV3Schema"])
    raise SystemExit(f"the CRD has no version {version}")


def check_serve_config(manifest: dict) -> int:
    """serveConfigV2 against Ray Serve's schema; each app built by sie_server.ray:app."""
    from ray.serve.schema import ServeDeploySchema

    from sie_server.ray import app as build

    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    for app in config.applications:
        build(app.args)  # Serve checks the deployment options (ray_actor_options, ...)
    return len(config.applications)


def main(argv: list[str]) -> None:
    crd = yaml.safe_load(Path(argv[0]).read_text())
    manifest = yaml.safe_load(Path(argv[1] if len(argv) > 1 else MANIFEST).read_text())
    if manifest["kind"] != crd["spec"]["names"]["kind"]:
        raise SystemExit(f"kind {manifest['kind']} is not {crd['spec']['names']['kind']}")
    errors = sorted(jsonschema.Draft7Validator(schema_for(crd, manifest["apiVersion"]))
                    .iter_errors(manifest), key=lambda e: list(e.absolute_path))
    for e in errors:
        print(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")
    if errors:
        raise SystemExit(f"{len(errors)} schema error(s)")
    apps = check_serve_config(manifest)
    print(f"ok: {manifest['kind']} {manifest['metadata']['name']} matches the CRD "
          f"({manifest['apiVersion']}); serveConfigV2 holds {apps} valid application(s)")


if __name__ == "__main__":
    main(sys.argv[1:])
