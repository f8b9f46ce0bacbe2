// Renders /openapi.json as a list of endpoints grouped by tag: the offline API docs (no CDN, no framework).
"use strict";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function resolve(spec, schema) {
  if (schema && schema.$ref) return spec.components.schemas[schema.$ref.split("/").pop()];
  return schema;
}

async function render() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("description").textContent = `${spec.info.description} Version ${spec.info.version}.`;
  const byTag = new Map();
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags || ["other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push({ path, method, op });
    }
  }
  const root = document.getElementById("api");
  root.replaceChildren();
  for (const [tag, ops] of byTag) {
    root.appendChild(element("h2", "tag", tag));
    for (const { path, method, op } of ops) {
      const details = element("details", "op");
      const summary = element("summary");
      summary.append(element("span", `method ${method}`, method.toUpperCase()), element("span", "path", path),
                     element("span", "", op.summary));
      details.appendChild(summary);
      const body = element("div", "details");
      if (op.description) body.appendChild(element("p", "", op.description));
      if (op.parameters) {
        const list = element("ul");
        for (const p of op.parameters) list.appendChild(element("li", "", `${p.name} (${p.in}${p.required ? ", required" : ""}): ${p.description || ""}`));
        body.append(element("h4", "", "Parameters"), list);
      }
      if (op.requestBody) {
        body.appendChild(element("h4", "", "Request body"));
        for (const [type, content] of Object.entries(op.requestBody.content)) {
          body.appendChild(element("p", "", type));
          body.appendChild(element("pre", "", JSON.stringify(resolve(spec, content.schema), null, 1)));
        }
      }
      const list = element("ul");
      for (const [code, r] of Object.entries(op.responses)) list.appendChild(element("li", "", `${code}: ${r.description}`));
      body.append(element("h4", "", "Responses"), list);
      details.appendChild(body);
      root.appendChild(details);
    }
  }
}

render().catch((error) => { document.getElementById("api").textContent = "could not load /openapi.json: " + error; });
