package io.github.pop3kafka.consumer;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.HashMap;
import java.util.Map;
import org.apache.avro.AvroTypeException;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.MissingSchemaException;

/**
 * Decodes a Kafka value written by pop3-kafka, in either framing, into a {@link GenericRecord} of
 * the <em>current</em> schema of its type (Avro schema resolution fills fields an older writer did
 * not have with their defaults).
 *
 * <ul>
 *   <li>Avro single-object encoding: {@code C3 01}, the 8-byte little-endian CRC-64-AVRO
 *       fingerprint of the writer schema's Parsing Canonical Form, the Avro binary body. Decoded
 *       with Avro's own {@link BinaryMessageDecoder}, one per record type, to which every version
 *       of that type in schemas/ and schemas/history/ is added.
 *   <li>Confluent Schema Registry wire format: {@code 00}, the 4-byte big-endian schema id, the
 *       Avro binary body. The writer schema comes from a {@link SchemaLookup} (the registry); the
 *       frame is decoded by hand, no Confluent library needed.
 * </ul>
 *
 * Not thread-safe (the decoders and the id cache are not).
 */
public final class RecordDecoder {

  public static final byte[] SINGLE_OBJECT_MAGIC = {(byte) 0xC3, (byte) 0x01};
  public static final byte REGISTRY_MAGIC = 0x00;

  /** Where the writer schema of a registry frame comes from. */
  @FunctionalInterface
  public interface SchemaLookup {
    /**
     * The schema registered under {@code id}; throws {@link DecodeException} with code {@code
     * unknown_schema} when there is none, {@link IOException} when the registry cannot be asked.
     */
    Schema schemaById(int id) throws IOException, DecodeException;
  }

  /** The framing a value was written in, named as in the connector's config. */
  public enum Framing {
    SINGLE_OBJECT("single_object"),
    SCHEMA_REGISTRY("schema_registry");

    public final String label;

    Framing(String label) {
      this.label = label;
    }
  }

  /** A decoded value. {@code kind}: mail, dead_letter or chunk. */
  public record Decoded(
      Framing framing,
      Integer schemaId,
      String fingerprint,
      String writerName,
      String writerFile,
      String kind,
      GenericRecord record) {}

  /**
   * A value that could not be decoded. {@code code}: {@code not_ours} (not a pop3-kafka record:
   * another framing, a tombstone, a ledger entry), {@code unknown_schema} (unknown fingerprint or
   * schema id, or a writer schema that cannot be resolved into the current one), {@code
   * registry_unavailable} (the registry could not be asked), {@code malformed} (the body does not
   * decode with its writer schema).
   */
  public static final class DecodeException extends Exception {
    private static final long serialVersionUID = 1L;
    public final String code;

    public DecodeException(String code, String message) {
      super(message);
      this.code = code;
    }

    public DecodeException(String code, String message, Throwable cause) {
      super(message, cause);
      this.code = code;
    }
  }

  private static final Map<String, String> KINDS =
      Map.of(
          "io.pop3kafka.MailRecord", "mail",
          "io.pop3kafka.DeadLetter", "dead_letter",
          "io.pop3kafka.AttachmentChunk", "chunk");

  private final SchemaCatalogue catalogue;
  private final SchemaLookup registry;
  private final Map<String, BinaryMessageDecoder<GenericRecord>> singleObject = new HashMap<>();
  private final Map<Integer, Object> byId = new HashMap<>(); // Schema, or the DecodeException
  private final Map<String, GenericDatumReader<GenericRecord>> readers = new HashMap<>();

  /** {@code registry} may be null: registry frames then fail with {@code unknown_schema}. */
  public RecordDecoder(SchemaCatalogue catalogue, SchemaLookup registry) {
    this.catalogue = catalogue;
    this.registry = registry;
    for (SchemaCatalogue.Entry cur : catalogue.currentSchemas().values()) {
      String name = cur.schema().getFullName();
      BinaryMessageDecoder<GenericRecord> dec = new BinaryMessageDecoder<>(GenericData.get(), cur.schema());
      for (Schema version : catalogue.versionsOf(name)) {
        dec.addSchema(version);
      }
      singleObject.put(name, dec);
    }
  }

  public Decoded decode(byte[] value) throws DecodeException {
    if (value == null || value.length == 0) {
      throw new DecodeException("not_ours", "empty value (a tombstone?): not a pop3-kafka record");
    }
    if (value.length >= 2 && value[0] == SINGLE_OBJECT_MAGIC[0] && value[1] == SINGLE_OBJECT_MAGIC[1]) {
      return decodeSingleObject(value);
    }
    if (value[0] == REGISTRY_MAGIC) {
      return decodeRegistry(value);
    }
    throw new DecodeException(
        "not_ours",
        String.format(
            "value starts with %s: neither Avro single-object encoding (c301) nor the schema registry"
                + " wire format (00 + schema id)",
            hex(value, Math.min(4, value.length))));
  }

  private Decoded decodeSingleObject(byte[] value) throws DecodeException {
    if (value.length < 10) {
      throw new DecodeException(
          "not_ours", "value of " + value.length + " bytes is too short for an Avro single-object frame");
    }
    long fp = ByteBuffer.wrap(value, 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
    String fpHex = SchemaCatalogue.Entry.fingerprintHex(fp);
    SchemaCatalogue.Entry writer = catalogue.byFingerprint(fp);
    if (writer == null) {
      throw new DecodeException(
          "unknown_schema",
          "unknown schema fingerprint " + fpHex + ": not among the " + catalogue.entries().size()
              + " files of schemas/ and schemas/history/ (written by a newer pop3-kafka?)");
    }
    String name = writer.schema().getFullName();
    String kind = kindOf(name);
    BinaryMessageDecoder<GenericRecord> dec = singleObject.get(name);
    if (dec == null) {
      throw new DecodeException(
          "unknown_schema", writer.file() + " (" + name + ") has no current schema in schemas/ to read it as");
    }
    GenericRecord record;
    try {
      record = dec.decode(value);
    } catch (MissingSchemaException e) { // cannot happen: the fingerprint was found above
      throw new DecodeException("unknown_schema", "unknown schema fingerprint " + fpHex, e);
    } catch (AvroTypeException e) {
      throw new DecodeException(
          "unknown_schema", writer.file() + " cannot be read as the current " + name + ": " + e.getMessage(), e);
    } catch (IOException | RuntimeException e) {
      throw new DecodeException("malformed", "Avro body does not decode as " + writer.file() + ": " + e, e);
    }
    return new Decoded(Framing.SINGLE_OBJECT, null, fpHex, name, writer.file(), kind, record);
  }

  private Decoded decodeRegistry(byte[] value) throws DecodeException {
    if (value.length < 5) {
      throw new DecodeException(
          "not_ours", "value of " + value.length + " bytes is too short for the schema registry wire format");
    }
    int id = ByteBuffer.wrap(value, 1, 4).order(ByteOrder.BIG_ENDIAN).getInt();
    Schema writer = writerById(id);
    String name = writer.getFullName();
    String kind = kindOf(name);
    SchemaCatalogue.Entry reader = catalogue.current(name);
    if (reader == null) {
      throw new DecodeException("unknown_schema", "schema id " + id + " (" + name + ") has no current schema in schemas/");
    }
    SchemaCatalogue.Entry local = catalogue.byCanonicalForm(writer);
    GenericDatumReader<GenericRecord> datumReader =
        readers.computeIfAbsent(
            id + "/" + name, k -> new GenericDatumReader<>(writer, reader.schema(), GenericData.get()));
    GenericRecord record;
    try {
      BinaryDecoder in = DecoderFactory.get().binaryDecoder(value, 5, value.length - 5, null);
      record = datumReader.read(null, in);
      if (!in.isEnd()) {
        throw new DecodeException(
            "malformed", "bytes left over after decoding schema id " + id + " (" + name + ")");
      }
    } catch (AvroTypeException e) {
      throw new DecodeException(
          "unknown_schema", "schema id " + id + " cannot be read as the current " + name + ": " + e.getMessage(), e);
    } catch (IOException | RuntimeException e) {
      throw new DecodeException("malformed", "Avro body does not decode as schema id " + id + ": " + e, e);
    }
    return new Decoded(
        Framing.SCHEMA_REGISTRY, id, null, name, local == null ? null : local.file(), kind, record);
  }

  private Schema writerById(int id) throws DecodeException {
    Object cached = byId.get(id);
    if (cached instanceof Schema s) {
      return s;
    }
    if (cached instanceof DecodeException e) {
      throw new DecodeException(e.code, e.getMessage());
    }
    if (registry == null) {
      throw new DecodeException(
          "unknown_schema",
          "value is in the schema registry wire format (schema id " + id + ") but no registry was given (--registry URL)");
    }
    Schema schema;
    try {
      schema = registry.schemaById(id);
    } catch (DecodeException e) {
      byId.put(id, e); // a definite answer (no such id, not Avro): do not ask again for every record
      throw e;
    } catch (IOException e) {
      throw new DecodeException("registry_unavailable", "schema registry lookup of schema id " + id + " failed: " + e, e);
    }
    if (schema.getType() != Schema.Type.RECORD) {
      DecodeException e = new DecodeException("not_ours", "schema id " + id + " is not an Avro record schema");
      byId.put(id, e);
      throw e;
    }
    byId.put(id, schema);
    return schema;
  }

  private static String kindOf(String name) throws DecodeException {
    String kind = KINDS.get(name);
    if (kind != null) {
      return kind;
    }
    if (name.equals("io.pop3kafka.LedgerEntry")) {
      throw new DecodeException("not_ours", "value is an io.pop3kafka.LedgerEntry: the connector's internal state");
    }
    throw new DecodeException("not_ours", "value is a " + name + ": not a mail record, dead letter or chunk");
  }

  static String hex(byte[] b, int n) {
    StringBuilder sb = new StringBuilder(2 * n);
    for (int i = 0; i < n; i++) {
      sb.append(String.format("%02x", b[i] & 0xff));
    }
    return sb.toString();
  }
}
