// Renders an Ollama-style chat TEMPLATE with Go's text/template, the engine Ollama itself uses, so tunekit can
// compare the Modelfile's template byte for byte with the model's Jinja chat template.
// stdin: {"template": "...", "cases": [{"System": "...", "Messages": [{"Role": "user", "Content": "..."}]}]}
// stdout: a JSON list with one rendered string per case (or {"error": "..."} and exit status 1).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	System   string
	Messages []Message
}

type Input struct {
	Template string
	Cases    []Case
}

func fail(err error) {
	json.NewEncoder(os.Stdout).Encode(map[string]string{"error": err.Error()})
	os.Exit(1)
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fail(fmt.Errorf("reading input: %w", err))
	}
	tmpl, err := template.New("modelfile").Parse(in.Template)
	if err != nil {
		fail(fmt.Errorf("parsing template: %w", err))
	}
	out := make([]string, 0, len(in.Cases))
	for i, c := range in.Cases {
		var b strings.Builder
		if err := tmpl.Execute(&b, c); err != nil {
			fail(fmt.Errorf("case %d: %w", i, err))
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
