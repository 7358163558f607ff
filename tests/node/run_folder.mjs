// Runs an exported model folder in Node, as tests/test_node.py asks on stdin (one JSON object), and prints what
// each runtime computed as one JSON object on stdout.
//
// Request:  {"folder": "/abs/model", "files": {"fp32": "model.onnx", ...}, "input_ids": [[...]], "attention_mask":
//            [[...]], "output": "sentence_embedding", "texts": [...], "pipelines": [{"task": "feature-extraction",
//            "dtype": "fp32", "options": {"pooling": "mean", "normalize": false}, "args": [optional]}]}
// Response: {"versions": {...}, "node": {variant: rows}, "web": {variant: rows}, "pipelines": [rows or {"error"}]}
//
// "node" is onnxruntime-node, "web" onnxruntime-web's wasm backend, "pipelines" transformers.js pipelines loading
// the folder from local files only (env.allowRemoteModels = false).
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const request = JSON.parse(readFileSync(0, "utf-8"));

function version(name) {
  return JSON.parse(readFileSync(path.join(here, "node_modules", name, "package.json"), "utf-8")).version;
}

function feeds(ort, inputNames) {
  const rows = request.input_ids.length;
  const width = request.input_ids[0].length;
  const tensor = (matrix) => new ort.Tensor("int64", BigInt64Array.from(matrix.flat().map(BigInt)), [rows, width]);
  const all = { input_ids: tensor(request.input_ids), attention_mask: tensor(request.attention_mask) };
  return Object.fromEntries(inputNames.map((name) => [name, all[name]]));
}

function rows(tensor) {
  const [count] = tensor.dims;
  const width = tensor.data.length / count;
  return Array.from({ length: count }, (_, i) => Array.from(tensor.data.slice(i * width, (i + 1) * width), Number));
}

async function runAll(ort, options) {
  const out = {};
  for (const [variant, file] of Object.entries(request.files)) {
    try {
      const session = await ort.InferenceSession.create(path.join(request.folder, file), options);
      const result = await session.run(feeds(ort, session.inputNames));
      out[variant] = rows(result[request.output]);
    } catch (error) {
      out[variant] = { error: String(error && error.message ? error.message : error) };
    }
  }
  return out;
}

const response = { versions: {}, node: {}, web: {}, pipelines: [] };
for (const name of ["onnxruntime-node", "onnxruntime-web", "@huggingface/transformers"]) {
  response.versions[name] = version(name);
}

const ortNode = await import("onnxruntime-node");
response.node = await runAll(ortNode.default ?? ortNode, { executionProviders: ["cpu"] });

const ortWeb = await import("onnxruntime-web");
const web = ortWeb.default ?? ortWeb;
web.env.wasm.numThreads = 1;
response.web = await runAll(web, { executionProviders: ["wasm"] });

if (request.pipelines && request.pipelines.length) {
  const { pipeline, env } = await import("@huggingface/transformers");
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.useBrowserCache = false;
  env.localModelPath = path.dirname(request.folder) + path.sep;
  for (const spec of request.pipelines) {
    try {
      const run = await pipeline(spec.task, path.basename(request.folder), { dtype: spec.dtype, device: "cpu" });
      // "args": the pipeline's own positional arguments (question answering: questions, contexts); else the texts.
      const args = spec.args ?? [request.texts];
      const result = await run(...args, spec.options ?? {});
      response.pipelines.push(typeof result.tolist === "function" ? result.tolist() : result);
      await run.dispose();
    } catch (error) {
      response.pipelines.push({ error: String(error && error.stack ? error.stack : error) });
    }
  }
}

process.stdout.write(JSON.stringify(response));
