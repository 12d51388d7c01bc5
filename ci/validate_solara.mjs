// Validates FHIR R4 resources (one JSON per line) with @solarahealth/fhir-r4's zod schemas.
//
// Each resource is checked by the schema of its type, `create<Type>Schema().safeParse(obj)`
// (strict objects: unknown elements, codes outside required bindings, malformed primitives
// and missing required elements are errors). The package's `/all` union of every resource
// fails to build with its zod version, so the per-type schemas are used.
//
// Usage: HL7GW_SOLARA_DIR=<folder with node_modules> node validate_solara.mjs FILE.ndjson
// Prints `INVALID line N Type/id: reason` for each invalid resource, then a summary line.
// Exit status: 0 all valid, 1 some invalid, 2 usage or no resources.

import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const NAME = '@solarahealth/fhir-r4';
const [file] = process.argv.slice(2);
const folder = process.env.HL7GW_SOLARA_DIR;
if (!file || !folder) {
  console.error('usage: HL7GW_SOLARA_DIR=DIR node validate_solara.mjs FILE.ndjson');
  process.exit(2);
}
const fhir = createRequire(join(folder, 'package.json'))('@solarahealth/fhir-r4');

const schemas = new Map();
function schemaFor(type) {
  if (!schemas.has(type)) {
    const create = /^[A-Z][A-Za-z]+$/.test(type) ? fhir[`create${type}Schema`] : undefined;
    const schema = typeof create === 'function' ? create() : undefined;
    // Datatype schemas have no resourceType: only resource schemas count.
    schemas.set(type, schema?.shape?.resourceType ? schema : undefined);
  }
  return schemas.get(type);
}

function describe(issues) {
  const shown = issues.slice(0, 3).map((issue) => {
    const path = issue.path.length ? issue.path.join('.') : '(resource)';
    return `${path}: ${issue.message}`;
  });
  if (issues.length > 3) shown.push(`... ${issues.length - 3} more`);
  return shown.join('; ').slice(0, 400);
}

let total = 0;
let invalid = 0;
const lines = readFileSync(file, 'utf8').split('\n');
lines.forEach((text, index) => {
  if (!text.trim()) return;
  total += 1;
  let resource;
  let reason;
  try {
    resource = JSON.parse(text);
  } catch (error) {
    reason = `not JSON: ${error.message}`;
  }
  const type = resource?.resourceType;
  const label = `${type ?? '?'}/${resource?.id ?? '?'}`;
  if (!reason) {
    const schema = typeof type === 'string' ? schemaFor(type) : undefined;
    if (!schema) {
      reason = `unknown resourceType ${JSON.stringify(type)}`;
    } else {
      const result = schema.safeParse(resource);
      if (!result.success) reason = describe(result.error.issues);
    }
  }
  if (reason) {
    invalid += 1;
    console.log(`INVALID line ${index + 1} ${label}: ${reason}`);
  }
});
console.log(`${NAME}: ${total} resources, ${total - invalid} valid, ${invalid} invalid`);
if (total === 0) {
  console.error(`${NAME}: no resources to validate in ${file}`);
  process.exit(2);
}
process.exit(invalid ? 1 : 0);
