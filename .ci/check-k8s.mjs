// Validates rendered Kubernetes manifests: every object against the API
// schema (kubernetes-models), then the properties the deployment relies on.
//   node .ci/check-k8s.mjs OVERLAY=rendered.yaml ...
import { readFileSync } from 'node:fs';
import { parseAllDocuments } from 'yaml';

let failures = 0;
const fail = (where, message) => {
  console.error(`FAIL ${where}: ${message}`);
  failures++;
};
const check = (where, condition, message) => {
  if (!condition) fail(where, message);
};
const seconds = (text) => {
  const match = /^(\d+)s$/.exec(text ?? '');
  return match ? Number(match[1]) : NaN;
};

for (const argument of process.argv.slice(2)) {
  const [overlay, file] = argument.split('=');
  const objects = parseAllDocuments(readFileSync(file, 'utf8'))
    .map((document) => document.toJS())
    .filter(Boolean);
  const byKind = {};
  for (const object of objects) {
    const where = `${overlay} ${object.kind}/${object.metadata?.name}`;
    const [group, version] = object.apiVersion.includes('/')
      ? object.apiVersion.split('/')
      : [null, object.apiVersion];
    const path = `kubernetes-models/${group ? `${group}/` : ''}${version}/${object.kind}`;
    let Model;
    try {
      const module = await import(path);
      Model = module[object.kind] ?? module.default;
    } catch (error) {
      fail(where, `no schema for ${object.apiVersion} ${object.kind}`);
      continue;
    }
    if (object.kind === 'Secret' && object.data) {
      // kustomize wraps long base64 values over lines; the API server's
      // decoder (Go's encoding/base64) skips the newlines, the schema's
      // "byte" format does not.
      for (const key of Object.keys(object.data)) {
        object.data[key] = object.data[key].replace(/\s+/g, '');
      }
    }
    try {
      new Model(object).validate();
    } catch (error) {
      fail(where, `schema: ${error.message}`);
    }
    (byKind[object.kind] ??= []).push(object);
  }

  for (const kind of ['StatefulSet', 'Service', 'PodDisruptionBudget', 'NetworkPolicy',
                      'ServiceAccount']) {
    check(overlay, byKind[kind]?.length, `no ${kind}`);
  }
  check(overlay, !byKind.Deployment, 'the store needs a StatefulSet, not a Deployment');
  const deployment = (byKind.StatefulSet ?? []).find((s) => s.metadata.name === 'callsession');
  check(overlay, deployment, 'no StatefulSet callsession');
  if (!deployment) continue;
  const where = `${overlay} StatefulSet`;
  const pod = deployment.spec.template.spec;
  const storeOf = (container) =>
    (container.env ?? []).find((e) => e.name === 'CALLSESSION_STORE')?.value ?? 'rocksdb';
  // The replicated store (High availability): replicas on etcd, no volume.
  const replicated = pod.containers.some((c) => storeOf(c) === 'etcd');
  const governing = (byKind.Service ?? []).find((s) => s.metadata.name === deployment.spec.serviceName);
  check(where, governing?.spec?.clusterIP === 'None',
        `serviceName ${deployment.spec.serviceName} must be a rendered headless Service`);
  const claims = Object.fromEntries(
    (deployment.spec.volumeClaimTemplates ?? []).map((c) => [c.metadata.name, c]));
  if (replicated) {
    check(where, deployment.spec.replicas >= 3, 'a leader and at least two standbys');
    check(where, deployment.spec.podManagementPolicy === 'Parallel',
          'Parallel pod management (only the leader is ever ready)');
    const antiAffinity = pod.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? [];
    check(where, antiAffinity.some((term) => term.topologyKey === 'kubernetes.io/hostname'),
          'required anti-affinity across nodes');
    const budget = (byKind.PodDisruptionBudget ?? []).find((b) => b.metadata.name === 'callsession');
    check(where, budget?.spec?.maxUnavailable === 1 &&
          budget?.spec?.unhealthyPodEvictionPolicy === 'AlwaysAllow',
          'a PodDisruptionBudget evicting one replica at a time, standbys (never ready) always');
    const etcd = (byKind.StatefulSet ?? []).find((s) => s.metadata.name !== 'callsession');
    if (etcd) {
      check(`${overlay} StatefulSet ${etcd.metadata.name}`, etcd.spec.replicas === 3,
            'a 3-member etcd');
      const etcdArgs = etcd.spec.template.spec.containers.flatMap((c) => [...(c.command ?? []), ...(c.args ?? [])]);
      check(`${overlay} StatefulSet ${etcd.metadata.name}`,
            etcdArgs.some((a) => a.startsWith('--max-txn-ops=')), 'etcd --max-txn-ops set');
    }
  } else {
    check(where, deployment.spec.replicas === 1, 'one process per store: exactly one replica');
    check(where, Object.keys(claims).length > 0, 'a volumeClaimTemplate for the store');
  }
  for (const claim of Object.values(claims)) {
    check(where, claim.spec?.accessModes?.includes('ReadWriteOnce'), 'a ReadWriteOnce volume');
    check(where, claim.spec?.resources?.requests?.storage, 'a storage request');
  }
  check(where, pod.securityContext?.fsGroup === 10001, 'fsGroup 10001, so uid 10001 can write');
  check(where, pod.securityContext?.runAsNonRoot === true, 'pod must run as non-root');
  check(where, pod.automountServiceAccountToken === false, 'no service account token needed');
  for (const container of pod.containers) {
    const at = `${where} container ${container.name}`;
    const security = container.securityContext ?? {};
    check(at, security.readOnlyRootFilesystem === true, 'read-only root filesystem');
    check(at, security.allowPrivilegeEscalation === false, 'no privilege escalation');
    check(at, security.capabilities?.drop?.includes('ALL'), 'drop all capabilities');
    check(at, container.livenessProbe?.grpc?.port === 50051, 'native gRPC liveness probe');
    const startup = container.startupProbe;
    const startupBudget = (startup?.periodSeconds ?? 10) * (startup?.failureThreshold ?? 3);
    check(at, startup?.grpc?.port === 50051 && startupBudget >= 60,
          `a gRPC startup probe allowing at least 60 s to recover the store (${startupBudget} s)`);
    check(at, container.readinessProbe?.grpc?.port === 50051, 'native gRPC readiness probe');
    check(at, container.resources?.requests?.cpu && container.resources?.requests?.memory,
          'resource requests');
    check(at, container.resources?.limits?.memory, 'memory limit');
    const env = Object.fromEntries((container.env ?? []).map((e) => [e.name, e]));
    if (replicated) {
      check(at, env.CALLSESSION_ETCD_ENDPOINTS?.value, 'CALLSESSION_ETCD_ENDPOINTS set');
      check(at, env.POD_NAME?.valueFrom?.fieldRef?.fieldPath === 'metadata.name',
            'POD_NAME from the downward API');
      check(at, env.CALLSESSION_MEMBER_NAME?.value?.includes('$(POD_NAME)'),
            'CALLSESSION_MEMBER_NAME from the pod name');
      check(at, env.CALLSESSION_ADVERTISE_ADDRESS?.value?.includes('$(POD_NAME)') &&
            env.CALLSESSION_ADVERTISE_ADDRESS.value.includes(deployment.spec.serviceName),
            'CALLSESSION_ADVERTISE_ADDRESS: the pod\'s DNS name in the headless Service');
      const names = (container.env ?? []).map((e) => e.name);
      check(at, names.indexOf('POD_NAME') < names.indexOf('CALLSESSION_MEMBER_NAME') &&
            names.indexOf('POD_NAME') < names.indexOf('CALLSESSION_ADVERTISE_ADDRESS'),
            'POD_NAME defined before the variables that use it');
      check(at, container.readinessProbe?.grpc?.service === 'callsession.v1.CallSessionService',
            'readiness on the application service: only the leader is ready');
      check(at, !container.livenessProbe?.grpc?.service,
            'liveness on the overall status (standbys are alive, not ready)');
      check(at, !env.CALLSESSION_DATA_DIR, 'no data directory with the etcd store');
    } else {
      const dataDir = env.CALLSESSION_DATA_DIR?.value ?? '';
      const mount = (container.volumeMounts ?? []).find(
        (m) => claims[m.name] && dataDir.startsWith(`${m.mountPath}/`));
      check(at, mount, `CALLSESSION_DATA_DIR ${dataDir} must be inside a claimed volume's mount`);
      check(at, env.CALLSESSION_STORE === undefined || env.CALLSESSION_STORE.value === 'rocksdb',
            'the durable store');
    }
    // The tenants file from a Secret mounted as a directory: a subPath
    // mount would never see the Secret's updates (no reload).
    const tenantsFile = env.CALLSESSION_TENANTS_FILE?.value ?? '';
    check(at, tenantsFile, 'CALLSESSION_TENANTS_FILE set (open mode is for development only)');
    const volumes = Object.fromEntries((pod.volumes ?? []).map((v) => [v.name, v]));
    const tenantsMount = (container.volumeMounts ?? []).find(
      (m) => tenantsFile.startsWith(`${m.mountPath}/`));
    check(at, tenantsMount && volumes[tenantsMount.name]?.secret,
          `CALLSESSION_TENANTS_FILE ${tenantsFile} must be inside a Secret volume's mount`);
    if (tenantsMount) {
      check(at, !tenantsMount.subPath, 'the tenants Secret mounted without subPath (updates)');
      check(at, tenantsMount.readOnly === true, 'the tenants Secret mounted read-only');
      const tenantsSecret = volumes[tenantsMount.name]?.secret?.secretName;
      const rendered = (byKind.Secret ?? []).find((s) => s.metadata.name === tenantsSecret);
      if ((byKind.Secret ?? []).length) {
        const key = tenantsFile.slice(tenantsMount.mountPath.length + 1);
        check(at, rendered?.data?.[key] ?? rendered?.stringData?.[key],
              `Secret ${tenantsSecret} rendered with key ${key}`);
      }
    }
    const secretName = env.CALLSESSION_PROVIDER_TOKEN?.valueFrom?.secretKeyRef?.name;
    check(at, secretName, 'provider token from a Secret');
    const generated = (byKind.Secret ?? []).map((s) => s.metadata.name);
    if (generated.length) {
      check(at, generated.includes(secretName), `secretKeyRef ${secretName} not rendered`);
    }
    const grace = seconds(env.CALLSESSION_SHUTDOWN_GRACE?.value);
    const sleep = Number(container.lifecycle?.preStop?.exec?.command?.at(-1));
    check(at, Number.isFinite(grace), 'CALLSESSION_SHUTDOWN_GRACE as <N>s');
    check(at, Number.isFinite(sleep), 'a preStop sleep');
    check(at, pod.terminationGracePeriodSeconds >= sleep + grace,
          `terminationGracePeriodSeconds ${pod.terminationGracePeriodSeconds} < preStop ` +
          `${sleep} + grace ${grace}`);
  }
  const ports = (byKind.Service ?? []).flatMap((s) => s.spec.ports.map((p) => p.port));
  check(overlay, ports.includes(50051) && ports.includes(9090), 'Services for gRPC and metrics');
  const annotations = deployment.spec.template.metadata.annotations ?? {};
  check(overlay, annotations['prometheus.io/scrape'] === 'true', 'Prometheus scrape annotation');
  console.log(`ok ${overlay}: ${objects.length} objects valid`);
}
process.exit(failures ? 1 : 0);
