// Validate one ServiceMonitor (JSON on stdin) with @kubernetes-models/prometheus-operator,
// generated from the Prometheus Operator's CRD schema. Prints "ok" or the errors (exit 1).
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let text = "";
for await (const chunk of process.stdin) text += chunk;
try {
  new ServiceMonitor(JSON.parse(text)).validate();
  console.log("ok");
} catch (e) {
  console.log(`invalid: ${e.message}`);
  process.exit(1);
}
