// Parses AsyncAPI documents with the official parser (@asyncapi/parser, pinned in package.json)
// and prints every diagnostic. Exit status 1 when any has severity error or warning, 2 on misuse.
//
//   node web/validate.mjs asyncapi.yaml [more.yaml ...]
//
// Output: one JSON object a document on stdout, {"file", "diagnostics": [{severity, code, message, path}]}.
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

import { DiagnosticSeverity, Parser } from "@asyncapi/parser";

const SEVERITY = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "information",
  [DiagnosticSeverity.Hint]: "hint",
};
const FAILING = new Set([DiagnosticSeverity.Error, DiagnosticSeverity.Warning]);

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE [FILE ...]");
  process.exit(2);
}

const parser = new Parser();
let failed = false;
for (const file of files) {
  const path = resolve(file);
  const { document, diagnostics } = await parser.parse(await readFile(path, "utf8"), {
    source: pathToFileURL(path).href,
  });
  const found = diagnostics.map((d) => ({
    severity: SEVERITY[d.severity] ?? String(d.severity),
    code: String(d.code),
    message: d.message,
    path: d.path.join("/"),
  }));
  if (document === undefined || diagnostics.some((d) => FAILING.has(d.severity))) {
    failed = true;
  }
  console.log(JSON.stringify({ file, parsed: document !== undefined, diagnostics: found }));
}
process.exit(failed ? 1 : 0);
