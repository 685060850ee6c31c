// Validates KEDA resources against the schema of KEDA's Go API, as @kubernetes-models/keda ships it.
// stdin: a JSON array of resources (keda.sh/v1alpha1); stdout: a JSON array, one entry per resource:
// {kind, name, errors: [message, ...]} (errors empty when valid). Used by tests/unit/test_deploy_offline.py.
import { readFileSync } from "node:fs";
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

const resources = JSON.parse(readFileSync(0, "utf8"));
const results = resources.map((resource) => {
  const kind = resource.kind;
  const name = resource.metadata?.name ?? "";
  const Model = keda[kind];
  if (resource.apiVersion !== "keda.sh/v1alpha1" || typeof Model !== "function") {
    return { kind, name, errors: [`not a keda.sh/v1alpha1 kind this package knows: ${resource.apiVersion} ${kind}`] };
  }
  try {
    new Model(resource).validate();
    return { kind, name, errors: [] };
  } catch (error) {
    return { kind, name, errors: String(error.message).split(", ") };
  }
});
process.stdout.write(JSON.stringify(results));
