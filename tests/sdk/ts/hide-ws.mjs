// Preloaded with `node --import ./hide-ws.mjs`: makes the optional `ws` package
// unresolvable, as on an install without it, so the SDK takes its HTTP fallback.
import { register } from "node:module";

register(
  "data:text/javascript," +
    encodeURIComponent(
      "export async function resolve(specifier, context, next) {" +
        "  if (specifier === 'ws') {" +
        "    const error = new Error(\"Cannot find package 'ws'\");" +
        "    error.code = 'ERR_MODULE_NOT_FOUND';" +
        "    throw error;" +
        "  }" +
        "  return next(specifier, context);" +
        "}",
    ),
);
