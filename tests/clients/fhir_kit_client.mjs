// Reads the gateway's FHIR API with fhir-kit-client, a FHIR client library we did not write.
// Usage: FHIR_KIT_CLIENT_DIR=DIR node tests/clients/fhir_kit_client.mjs BASE_URL PATIENT_ID
// (DIR/node_modules holds fhir-kit-client, an ES module: ci/install_clients.sh installs it.)
// Prints "fhir-kit-client: ok" when every check passed; exits non-zero otherwise.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const packageDir = join(process.env.FHIR_KIT_CLIENT_DIR, 'node_modules', 'fhir-kit-client');
const manifest = JSON.parse(readFileSync(join(packageDir, 'package.json'), 'utf8'));
const entry = (manifest.exports && manifest.exports['.'] && manifest.exports['.'].import) || manifest.main;
const { Client } = await import(pathToFileURL(join(packageDir, entry)).href);

function check(condition, what) {
  if (!condition) {
    throw new Error(`check failed: ${what}`);
  }
}

async function main() {
  const [baseUrl, patientId] = process.argv.slice(2);
  const client = new Client({ baseUrl });

  const capability = await client.capabilityStatement();
  check(capability.fhirVersion === '4.0.1', `fhirVersion 4.0.1, got ${capability.fhirVersion}`);

  const patient = await client.read({ resourceType: 'Patient', id: patientId });
  check(patient.resourceType === 'Patient' && patient.id === patientId, 'read Patient');

  const first = await client.vread({ resourceType: 'Patient', id: patientId, version: '1' });
  check(first.meta.versionId === '1', 'vread version 1');

  const history = await client.resourceHistory({ resourceType: 'Patient', id: patientId });
  check(history.type === 'history' && history.entry.length >= 2, 'instance history has both versions');

  const byIdentifier = await client.search({ resourceType: 'Patient', searchParams: { identifier: 'E2E-MRN-1' } });
  check(byIdentifier.total === 1, `search Patient by identifier, total ${byIdentifier.total}`);

  // Page through the patient's resources one at a time, following `next` links.
  let page = await client.search({ resourceType: 'Observation', searchParams: { patient: patientId, _count: 1 } });
  let seen = 0;
  while (page) {
    seen += (page.entry || []).filter((entry) => entry.search && entry.search.mode === 'match').length;
    page = await client.nextPage({ bundle: page });
  }
  check(seen >= 1, `paged through observations, saw ${seen}`);

  const everything = await client.request(`Patient/${patientId}/$everything`);
  check(everything.entry.some((entry) => entry.resource.resourceType === 'Observation'), '$everything has the Observation');

  try {
    await client.read({ resourceType: 'Patient', id: 'does-not-exist' });
    check(false, 'reading an unknown Patient must fail');
  } catch (error) {
    const status = error.response && error.response.status;
    check(status === 404, `unknown Patient is 404, got ${status}`);
    check(error.response.data.resourceType === 'OperationOutcome', 'the 404 carries an OperationOutcome');
  }
  console.log(`fhir-kit-client: ok (${seen} observation page(s))`);
}

main().catch((error) => {
  console.error(error.stack || error);
  process.exit(1);
});
